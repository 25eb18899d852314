"""Model configuration: the 16 fields of the released `original/config.json`, presets, and both config layouts."""

import dataclasses
import json
import math
from pathlib import Path

from gptoss.errors import ConfigError

RMS_NORM_EPS = 1e-5  # not in the released config; fixed by the reference model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {f.name!r} must be a positive number, got {value!r}")
            if f.type is int and value != int(value):
                raise ConfigError(f"config field {f.name!r} must be an integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of 32 (the MXFP4 block size)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def max_context_length(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_window(self, layer_idx: int) -> int | None:
        """Even layers attend over a sliding window of keys; odd layers over all earlier keys."""
        return self.sliding_window if layer_idx % 2 == 0 else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        """Builds a config from either layout's config.json contents."""
        if "model_type" in raw:
            return _from_hf_dict(raw, source)
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw]
        if missing:
            raise ConfigError(f"{source}: missing field {missing[0]!r}")
        return _checked(cls, raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict:
        """The Hugging Face `config.json` for this model (quantization_config is added by the writer)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_context_length,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": False,
            },
            "layer_types": [
                "sliding_attention" if self.layer_window(i) else "full_attention" for i in range(self.num_hidden_layers)
            ],
            "rms_norm_eps": RMS_NORM_EPS,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "initializer_range": 0.02,
            # the release's special-token ids; a test config with a smaller vocabulary has no such tokens
            "eos_token_id": 200002 if self.vocab_size > 200002 else None,
            "pad_token_id": 199999 if self.vocab_size > 199999 else None,
        }


def read_config_json(path: str | Path) -> dict:
    """A config.json's contents as a dict; ConfigError naming the file if it is missing or not a JSON object."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def _checked(cls, values: dict, source: str) -> ModelConfig:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: field {name!r} must be a number, got {value!r}")
        if fields[name].type is int:
            if value != int(value):
                raise ConfigError(f"{source}: field {name!r} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        typed[name] = value
    try:
        return cls(**typed)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _from_hf_dict(raw: dict, source: str) -> ModelConfig:
    if raw.get("model_type") != "gpt_oss":
        raise ConfigError(f"{source}: field 'model_type' is {raw.get('model_type')!r}, expected 'gpt_oss'")

    def need(*names):
        for name in names:
            if name in raw:
                return raw[name]
        raise ConfigError(f"{source}: missing field {names[0]!r}")

    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: missing field 'rope_scaling' (or 'rope_parameters')")
    if rope.get("rope_type", rope.get("type")) != "yarn":
        raise ConfigError(f"{source}: field 'rope_scaling.rope_type' must be 'yarn', got {rope.get('rope_type')!r}")
    if rope.get("truncate", False):
        raise ConfigError(f"{source}: field 'rope_scaling.truncate' must be false (gpt-oss uses unrounded YaRN bounds)")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta"))
    if rope_theta is None:
        raise ConfigError(f"{source}: missing field 'rope_theta'")

    values = {
        "num_hidden_layers": need("num_hidden_layers"),
        "num_experts": need("num_local_experts", "num_experts"),
        "experts_per_token": need("num_experts_per_tok", "experts_per_token"),
        "vocab_size": need("vocab_size"),
        "hidden_size": need("hidden_size"),
        "intermediate_size": need("intermediate_size"),
        "swiglu_limit": raw.get("swiglu_limit", 7.0),
        "head_dim": need("head_dim"),
        "num_attention_heads": need("num_attention_heads"),
        "num_key_value_heads": need("num_key_value_heads"),
        "sliding_window": need("sliding_window"),
        "initial_context_length": rope.get("original_max_position_embeddings", raw.get("initial_context_length", 4096)),
        "rope_theta": rope_theta,
        "rope_scaling_factor": rope.get("factor", 1.0),
        "rope_ntk_alpha": rope.get("beta_slow", 1.0),
        "rope_ntk_beta": rope.get("beta_fast", 32.0),
    }
    for hf_name, original_name in (("num_local_experts", "num_experts"), ("num_experts_per_tok", "experts_per_token")):
        if hf_name in raw and original_name in raw and raw[hf_name] != raw[original_name]:
            raise ConfigError(
                f"{source}: field {hf_name!r} ({raw[hf_name]}) contradicts {original_name!r} ({raw[original_name]})"
            )
    eps = raw.get("rms_norm_eps", RMS_NORM_EPS)
    if not math.isclose(eps, RMS_NORM_EPS):
        raise ConfigError(f"{source}: field 'rms_norm_eps' is {eps}, gpt-oss uses {RMS_NORM_EPS}")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(values["num_hidden_layers"])]
        if list(layer_types) != expected:
            raise ConfigError(
                f"{source}: field 'layer_types' must alternate sliding_attention/full_attention starting with "
                f"sliding_attention over {values['num_hidden_layers']} layers"
            )
    return _checked(ModelConfig, values, source)


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_experts=128),
    # Small enough for CPU tests and the demo; keeps the real vocabulary so the tokenizer works with it, the real
    # RoPE/YaRN constants, GQA (4 query heads per KV head) and the 128-token window.
    "tiny": ModelConfig(
        num_hidden_layers=4,
        num_experts=8,
        hidden_size=128,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
