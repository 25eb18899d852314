"""The released checkpoint layouts and how their tensor names map onto the model's (original-layout) names.

`original`: `<repo>/original/` — model keys are these names exactly.
`hf`: the Hugging Face repo root — q/k/v are separate row blocks of our fused qkv, experts are either MXFP4
blocks/scales (byte-identical to original) or dequantized and transposed (`gate_up_proj` [E, H, 2I],
`down_proj` [E, I, H]).
"""

import dataclasses

from gptoss.config import ModelConfig

ORIGINAL = "original"
HF = "hf"
LAYOUTS = (ORIGINAL, HF)
MXFP4 = "mxfp4"
DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a model state key, optionally a block of its rows, optionally
    transposed in its last two dims first (HF's dense experts are stored input-major)."""

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False

    def source_shape(self, target_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(target_shape)
        if self.rows is not None:
            shape[0] = self.rows[1] - self.rows[0]
        if self.transpose:
            shape[-2], shape[-1] = shape[-1], shape[-2]
        return tuple(shape)


def tensor_names(config: ModelConfig, layout: str, experts: str) -> dict[str, Target]:
    """Every tensor name a checkpoint of this layout must hold, mapped to where it goes in the model.

    Dense-expert targets are `block.N.mlp.mlpX_weight.weight` (E, out, in); MXFP4 targets are `.blocks`/`.scales`.
    """
    if layout == ORIGINAL:
        if experts != MXFP4:
            raise ValueError("the original layout stores experts as MXFP4 only")
        return {name: Target(name) for name in _original_names(config)}
    names = {
        "model.embed_tokens.weight": Target("embedding.weight"),
        "model.norm.weight": Target("norm.scale"),
        "lm_head.weight": Target("unembedding.weight"),
    }
    q, kv = config.q_dim, config.kv_dim
    row_blocks = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    for n in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{n}", f"block.{n}"
        names[f"{hf}.input_layernorm.weight"] = Target(f"{ours}.attn.norm.scale")
        for proj, rows in row_blocks.items():
            names[f"{hf}.self_attn.{proj}.weight"] = Target(f"{ours}.attn.qkv.weight", rows=rows)
            names[f"{hf}.self_attn.{proj}.bias"] = Target(f"{ours}.attn.qkv.bias", rows=rows)
        names[f"{hf}.self_attn.o_proj.weight"] = Target(f"{ours}.attn.out.weight")
        names[f"{hf}.self_attn.o_proj.bias"] = Target(f"{ours}.attn.out.bias")
        names[f"{hf}.self_attn.sinks"] = Target(f"{ours}.attn.sinks")
        names[f"{hf}.post_attention_layernorm.weight"] = Target(f"{ours}.mlp.norm.scale")
        names[f"{hf}.mlp.router.weight"] = Target(f"{ours}.mlp.gate.weight")
        names[f"{hf}.mlp.router.bias"] = Target(f"{ours}.mlp.gate.bias")
        for hf_proj, ours_mlp in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
            prefix = f"{hf}.mlp.experts.{hf_proj}"
            names[f"{prefix}_bias"] = Target(f"{ours}.mlp.{ours_mlp}_bias")
            if experts == MXFP4:
                names[f"{prefix}_blocks"] = Target(f"{ours}.mlp.{ours_mlp}_weight.blocks")
                names[f"{prefix}_scales"] = Target(f"{ours}.mlp.{ours_mlp}_weight.scales")
            else:
                names[prefix] = Target(f"{ours}.mlp.{ours_mlp}_weight.weight", transpose=True)
    return names


def _original_names(config: ModelConfig) -> list[str]:
    names = ["embedding.weight"]
    for n in range(config.num_hidden_layers):
        b = f"block.{n}"
        names += [f"{b}.attn.norm.scale", f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias", f"{b}.attn.sinks",
                  f"{b}.attn.out.weight", f"{b}.attn.out.bias", f"{b}.mlp.norm.scale", f"{b}.mlp.gate.weight",
                  f"{b}.mlp.gate.bias", f"{b}.mlp.mlp1_weight.blocks", f"{b}.mlp.mlp1_weight.scales",
                  f"{b}.mlp.mlp1_bias", f"{b}.mlp.mlp2_weight.blocks", f"{b}.mlp.mlp2_weight.scales",
                  f"{b}.mlp.mlp2_bias"]
    return names + ["norm.scale", "unembedding.weight"]


def layer_of(name: str) -> int | None:
    """The layer index a tensor name belongs to (either layout), or None for embedding/norm/unembedding."""
    parts = name.split(".")
    for marker in ("block", "layers"):
        if marker in parts:
            return int(parts[parts.index(marker) + 1])
    return None
