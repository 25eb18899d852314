"""Random gpt-oss weights and a writer for both released layouts (same names, shapes and dtypes as the release).

Tests, benchmarks and the demo use these. Weights are scaled so activations stay finite over all layers:
linear weights ~ N(0, 1/in_features), MXFP4 experts with random codes and a scale chosen for the same variance.
"""

import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from gptoss import mxfp4
from gptoss.config import ModelConfig
from gptoss.errors import CheckpointError
from gptoss.layouts import DENSE, HF, MXFP4, ORIGINAL, layer_of, tensor_names
from gptoss.model import Transformer

_FP4_RMS = math.sqrt(sum(v * v for v in mxfp4.FP4_VALUES) / len(mxfp4.FP4_VALUES))


def random_tensors(config: ModelConfig, seed: int = 0, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (original-layout name, tensor) in checkpoint order; the same seed gives the same weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16
    h, i, e, v = config.hidden_size, config.intermediate_size, config.num_experts, config.vocab_size

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(bf16)

    def linear(out_features, in_features):
        return normal(out_features, in_features, std=in_features**-0.5)

    def norm_scale():
        return (1.0 + 0.1 * torch.randn(h, generator=gen, device=device)).to(bf16)

    def packed(out_features, in_features):
        groups = in_features // mxfp4.BLOCK_SIZE
        blocks = torch.randint(0, 256, (e, out_features, groups, mxfp4.BLOCK_SIZE // 2), generator=gen,
                               device=device, dtype=torch.uint8)
        # target rms 1/sqrt(in_features): 2**exp * FP4_RMS ~= in_features**-0.5, jittered by one step either way
        exponent = round(-math.log2(_FP4_RMS * math.sqrt(in_features)))
        scales = torch.randint(mxfp4.SCALE_BIAS + exponent - 1, mxfp4.SCALE_BIAS + exponent + 2,
                               (e, out_features, groups), generator=gen, device=device).to(torch.uint8)
        return blocks, scales

    qkv_out = config.q_dim + 2 * config.kv_dim
    yield "embedding.weight", normal(v, h, std=1.0)
    for n in range(config.num_hidden_layers):
        b = f"block.{n}"
        yield f"{b}.attn.norm.scale", norm_scale()
        yield f"{b}.attn.qkv.weight", linear(qkv_out, h)
        yield f"{b}.attn.qkv.bias", normal(qkv_out, std=0.02)
        yield f"{b}.attn.sinks", normal(config.num_attention_heads, std=1.0)
        yield f"{b}.attn.out.weight", linear(h, config.q_dim)
        yield f"{b}.attn.out.bias", normal(h, std=0.02)
        yield f"{b}.mlp.norm.scale", norm_scale()
        yield f"{b}.mlp.gate.weight", linear(e, h)
        yield f"{b}.mlp.gate.bias", normal(e, std=0.02)
        blocks, scales = packed(2 * i, h)
        yield f"{b}.mlp.mlp1_weight.blocks", blocks
        yield f"{b}.mlp.mlp1_weight.scales", scales
        yield f"{b}.mlp.mlp1_bias", normal(e, 2 * i, std=0.02)
        blocks, scales = packed(h, i)
        yield f"{b}.mlp.mlp2_weight.blocks", blocks
        yield f"{b}.mlp.mlp2_weight.scales", scales
        yield f"{b}.mlp.mlp2_bias", normal(e, h, std=0.02)
    yield "norm.scale", norm_scale()
    yield "unembedding.weight", linear(v, h)


def fill_random(model, seed: int = 0) -> None:
    """Fills a (possibly meta-initialized, then `to_empty`) model in place with random_tensors."""
    state = model.state_dict()
    packed_pairs = mxfp4.PairCollector()  # a dense-expert model receives blocks/scales pairs
    with torch.no_grad():
        for name, tensor in random_tensors(model.config, seed, device=model.device):
            if name in state:
                state[name].copy_(tensor)
            elif (pair := packed_pairs.add(name, tensor)) is not None:
                weight, blocks, scales = pair
                mxfp4.dequantize_into(state[weight + ".weight"], blocks, scales)
    model.rope.reset_buffers()


def to_hf_tensors(name: str, tensor: torch.Tensor, config: ModelConfig, experts: str,
                  packed_pairs: mxfp4.PairCollector) -> list[tuple[str, torch.Tensor]]:
    """Converts one original-layout tensor into its HF tensors. For dense experts a blocks/scales pair yields one
    dequantized, transposed tensor once both halves have been given."""
    by_target = _hf_targets(config, experts)
    if experts == DENSE and name.endswith((".blocks", ".scales")):
        pair = packed_pairs.add(name, tensor)
        if pair is None:
            return []
        weight, blocks, scales = pair
        dense = torch.empty(*scales.shape[:-1], scales.shape[-1] * mxfp4.BLOCK_SIZE, dtype=torch.bfloat16,
                            device=blocks.device)
        mxfp4.dequantize_into(dense, blocks, scales)  # (E, out, in)
        (hf_name, _), = by_target[weight + ".weight"]
        return [(hf_name, dense.transpose(-1, -2).contiguous())]
    out = []
    for hf_name, target in by_target[name]:
        piece = tensor if target.rows is None else tensor[target.rows[0] : target.rows[1]]
        out.append((hf_name, piece.contiguous()))
    return out


_hf_target_cache: dict = {}


def _hf_targets(config: ModelConfig, experts: str) -> dict[str, list]:
    """original name -> [(hf name, Target)], from the one name map in gptoss.layouts."""
    key = (config, experts)
    if key not in _hf_target_cache:
        by_target: dict[str, list] = {}
        for hf_name, target in tensor_names(config, HF, experts).items():
            by_target.setdefault(target.key, []).append((hf_name, target))
        _hf_target_cache[key] = by_target
    return _hf_target_cache[key]


def _shard_of(name: str, config: ModelConfig, num_shards: int) -> int:
    """Contiguous runs of layers per shard; embedding in the first shard, final norm/unembedding in the last."""
    layer = layer_of(name)
    if layer is None:
        return 0 if name == "embedding.weight" else num_shards - 1
    return layer * num_shards // config.num_hidden_layers


def write_checkpoint(
    out: str | Path,
    config: ModelConfig,
    layout: str = ORIGINAL,
    experts: str = MXFP4,
    seed: int = 0,
    device="cpu",
    num_shards: int | None = None,
    progress: bool = False,
) -> Path:
    """Writes random weights as a checkpoint folder; the folder appears only once it is complete."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: already exists and is not empty")
    if layout not in (ORIGINAL, HF):
        raise CheckpointError(f"unknown layout {layout!r}; choose original or hf")
    if layout == ORIGINAL and experts != MXFP4:
        raise CheckpointError("the original layout stores experts as MXFP4 only")
    if num_shards is None:
        with torch.device("meta"):
            state = Transformer(config).state_dict()
        total_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
        num_shards = max(1, math.ceil(total_gb / 10)) if layout == ORIGINAL else max(2, math.ceil(total_gb / 5))
    num_shards = min(num_shards, config.num_hidden_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_shards(staging, config, layout, experts, seed, device, num_shards, progress)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _shard_file(layout: str, index: int, num_shards: int) -> str:
    if layout == HF:
        return f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
    return "model.safetensors" if num_shards == 1 else f"model--{index + 1:05d}-of-{num_shards:05d}.safetensors"


def _write_shards(folder: Path, config, layout, experts, seed, device, num_shards, progress) -> None:
    weight_map = {}
    shard: dict[str, torch.Tensor] = {}
    current = 0
    packed_pairs = mxfp4.PairCollector()
    bar = tqdm(total=num_shards, desc="writing shards", disable=not progress)

    def flush():
        file = _shard_file(layout, current, num_shards)
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        shard.clear()
        bar.update(1)

    for name, tensor in random_tensors(config, seed, device):
        index = _shard_of(name, config, num_shards)
        if index != current:
            flush()
            current = index
        pieces = [(name, tensor)] if layout == ORIGINAL else to_hf_tensors(name, tensor, config, experts,
                                                                            packed_pairs)
        for piece_name, piece in pieces:
            shard[piece_name] = piece.cpu()
    flush()
    bar.close()
    if layout == ORIGINAL:
        (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        return
    hf_config = config.to_hf_dict()
    if experts == MXFP4:
        hf_config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                       "lm_head"],
        }
    hf_config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    index = {"metadata": {"total_size": sum((folder / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}) + "\n"
    )
