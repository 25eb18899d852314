"""LoRA adapters: low-rank updates W + (alpha / r) B A on the attention projections and on every expert's two
matrices, the base weights frozen.

- Attention (qkv, out): a torch parametrization of the nn.Linear's weight, so every code path that reads
  `module.weight` sees the adapted matrix.
- Experts: a store wrapper (LoRAExperts) around the MXFP4 or dense store; its `expert(e, dtype)` is the base
  expert (dequantized one at a time, as the pure MoE takes them) plus that expert's own B_e A_e. The packed
  weights stay packed; each expert has its own pair of low-rank factors (E of them per matrix).
B starts at zero, so a fresh adapter leaves the model's function unchanged; A starts as nn.Linear initializes its
weight (Kaiming uniform). The adapted weight is W + scale B A summed in float32 and rounded once to W's dtype: in
bf16 an update smaller than half a bf16 step of its weight does not show in the forward until it grows (its
gradient flows all the same). Training runs the pure path (Triton kernels serve only tensors that need no
gradient).

An adapter is a folder: adapter.safetensors (lora_a / lora_b tensors under the model's module names) and
adapter_config.json (rank, alpha, targets and the model shape it was trained for). `load_adapter` merges it into a
model for inference: into the attention weights, and into dense experts (a model loaded with dequantize=True); the
MXFP4 experts cannot take a dense update and keep their packed form, so an adapter with expert factors needs them
dequantized.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from gptoss.errors import GptOssError
from gptoss.experts import DenseExperts
from gptoss.parallel import Shard, held_ranges

TARGETS = ("attention", "experts")
_WEIGHTS, _CONFIG = "adapter.safetensors", "adapter_config.json"


def _factors(num: int | None, out_features: int, in_features: int, rank: int, device) -> tuple[torch.Tensor, ...]:
    """(A (.., r, in), B (.., out, r)) float32, B zero; num: a leading expert dimension."""
    lead = () if num is None else (num,)
    a = torch.empty(*lead, rank, in_features, device=device)
    for piece in a.view(-1, rank, in_features):
        nn.init.kaiming_uniform_(piece, a=math.sqrt(5))
    return a, torch.zeros(*lead, out_features, rank, device=device)


class LoRADelta(nn.Module):
    """Parametrization of a Linear's weight: W -> W + scale * B A (see _adapted)."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter, scale: float):
        super().__init__()
        self.scale = scale
        self.lora_a, self.lora_b = a, b

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _adapted(weight, self.lora_a, self.lora_b, self.scale)


class LoRAExperts(nn.Module):
    """An expert store (gptoss.experts) with a low-rank update per expert: expert(e) = base(e) + scale B_e A_e."""

    def __init__(self, base: nn.Module, a: nn.Parameter, b: nn.Parameter, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_a, self.lora_b = a, b

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return _adapted(self.base.expert(e, dtype), self.lora_a[e], self.lora_b[e], self.scale)


def _adapted(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A in float32, rounded once to W's dtype (training forward and merge alike)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def add_lora(model, rank: int = 8, alpha: float = 16.0, targets=TARGETS) -> list[nn.Parameter]:
    """Freezes the model and adds fresh adapters on `targets` ("attention": qkv and out of every layer; "experts":
    mlp1 and mlp2 of every expert); returns the trainable parameters (the factors).
    A tensor/expert-parallel shard holds the slices of the whole model's factors that go with its slices of the
    weights (every rank must call this with the same random state: each draws the whole factors and keeps its
    slices, so the ranks start from one process's adapter); a factor replicated over the ranks (qkv's A, out's B)
    gets the ranks' gradients summed."""
    _check_targets(targets)
    if rank < 1:
        raise GptOssError(f"LoRA rank must be at least 1, got {rank}")
    if model.lora_config is not None:
        raise GptOssError("the model already has a LoRA adapter")
    model.requires_grad_(False)
    config, device, scale = model.config, model.device, alpha / rank
    replicated = []
    shapes = {"attn.qkv": (None, config.q_dim + 2 * config.kv_dim, config.hidden_size),
              "attn.out": (None, config.hidden_size, config.q_dim),
              "mlp.mlp1_weight": (config.num_experts, 2 * config.intermediate_size, config.hidden_size),
              "mlp.mlp2_weight": (config.num_experts, config.hidden_size, config.intermediate_size)}
    for i, block in enumerate(model.block):
        for name, shape in shapes.items():
            if ("experts" if name.startswith("mlp") else "attention") not in targets:
                continue
            a, b = (nn.Parameter(t) for t in _held_factors(model, f"block.{i}.{name}", *_factors(*shape, rank, device)))
            for factor, kind in ((a, "lora_a"), (b, "lora_b")):
                if model.shard.parallel and _factor_split(f"block.{i}.{name}.{kind}", factor.dim(), model) is None:
                    factor.register_hook(lambda grad: model.shard.sum(grad.clone()))  # replicated over the ranks
                    replicated.append(factor)
            module, attr = block.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            if name.startswith("attn"):
                parametrize.register_parametrization(getattr(module, attr), "weight", LoRADelta(a, b, scale))
            else:
                setattr(module, attr, LoRAExperts(getattr(module, attr), a, b, scale))
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    model.lora_replicated = replicated
    return [p for name, p in model.named_parameters() if "lora_" in name]


def clip_grad_norm(model, params: list[nn.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ over the whole adapter: in a tensor/expert-parallel group the norm of every
    rank's slices together, each replicated factor counted once."""
    if not model.shard.parallel:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    replicated = {id(p) for p in model.lora_replicated}
    grads = [(p.grad, id(p) in replicated) for p in params if p.grad is not None]
    squares = sum(g.float().pow(2).sum() / (model.shard.world_size if rep else 1) for g, rep in grads)
    total = model.shard.sum(torch.as_tensor(squares, dtype=torch.float32, device=model.device).clone()).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g, _ in grads:
        g.mul_(coef.to(g.dtype))


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's factors by the names save_adapter writes (the parametrizations' bookkeeping names dropped): the
    whole model's, a shard's slices gathered from every rank (so every rank of a group must call it)."""
    return {_public_name(name): _whole_factor(model, _public_name(name), p.detach())
            for name, p in model.named_parameters() if "lora_" in name}


def _whole_factor(model, name: str, factor: torch.Tensor) -> torch.Tensor:
    """The whole model's factor `name` ("block.0.attn.qkv.lora_b", ...) from each rank's slices of it (the
    inverse of _held_factors); the factor itself where it is not split."""
    split = _factor_split(name, factor.dim(), model)
    if split is None:
        return factor
    dim = split[0]
    parts = model.shard.gather(factor)
    shape = list(factor.shape)
    shape[dim] = sum(t.shape[dim] for t in parts)
    whole = factor.new_empty(shape)
    for rank, part in enumerate(parts):
        ranges = _factor_split(name, factor.dim(), model, Shard(rank, model.shard.world_size, model.shard.group))[1]
        for (start, stop), piece in zip(ranges, part.split([stop - start for start, stop in ranges], dim=dim)):
            whole.narrow(dim, start, stop - start).copy_(piece)
    return whole


def _factor_split(name: str, ndim: int, model, shard: Shard | None = None) -> tuple[int, list] | None:
    """(dim, ranges): the indices along dim of the whole factor `name` ("block.0.attn.qkv.lora_b", ...; ndim 3 for
    an expert store's) that a rank (`shard`, by default the model's) holds, as gptoss.parallel splits the weight it
    updates: B's rows where it splits the weight's rows, A's columns where it splits its columns, both factors'
    experts for an expert store. None where the rank holds the factor whole: in one process, and where the other
    factor carries the split (qkv's A, out's B, replicated over the ranks)."""
    module, _, kind = name.rpartition(".")
    held = held_ranges(module + ".weight", model.config, shard or model.shard)
    if held is None:
        return None
    dim, ranges = held
    if ndim == 3:
        return 0, ranges
    return (dim, ranges) if kind == ("lora_b" if dim == 0 else "lora_a") else None


def _public_name(name: str) -> str:
    # "block.0.attn.qkv.parametrizations.weight.0.lora_a" -> "block.0.attn.qkv.lora_a"
    return name.replace(".parametrizations.weight.0", "")


def save_adapter(model, folder: str | os.PathLike) -> Path:
    """Writes the model's adapter (add_lora) into folder, each file complete or not there (written, then renamed).
    A tensor/expert-parallel group writes the whole model's adapter once: every rank calls this, rank 0 writes."""
    from safetensors.torch import save_file

    if model.lora_config is None:
        raise GptOssError("the model has no LoRA adapter (add_lora)")
    folder = Path(folder)
    config = {**model.lora_config, "model": _shape(model.config)}
    tensors = {name: t.float().contiguous().cpu() for name, t in adapter_state(model).items()}
    if model.shard.rank != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in ((_WEIGHTS, lambda path: save_file(tensors, str(path))),
                        (_CONFIG, lambda path: path.write_text(json.dumps(config, indent=1) + "\n"))):
        partial = folder / (name + ".partial")
        write(partial)
        os.replace(partial, folder / name)
    return folder


def load_adapter(model, folder: str | os.PathLike) -> dict:
    """Merges a saved adapter into the model's weights (see the module docstring); returns its config. A
    tensor/expert-parallel shard merges the slices of the update that its weights hold."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path, weights_path = folder / _CONFIG, folder / _WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise GptOssError(f"{path}: no such file (an adapter folder holds {_CONFIG} and {_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text())
        rank, alpha, targets = int(config["rank"]), float(config["alpha"]), config["targets"]
    except (ValueError, KeyError, TypeError) as e:
        raise GptOssError(f"{config_path}: not an adapter config ({type(e).__name__}: {e})") from None
    _check_targets(targets, where=str(config_path))
    if config.get("model") != _shape(model.config):
        raise GptOssError(f"{config_path}: the adapter was trained for {config.get('model')}, the model is "
                          f"{_shape(model.config)}")
    with safe_open(str(weights_path), "pt") as f:
        pairs = _pairs({name: f.get_tensor(name) for name in f.keys()}, weights_path)
    pairs = {name: _held_factors(model, name, a, b) for name, (a, b) in pairs.items()}
    targets = {name: _target(model, name, a, b, weights_path) for name, (a, b) in pairs.items()}  # all checked
    with torch.no_grad():  # before any weight changes
        for name, (a, b) in pairs.items():
            _merge(targets[name], a, b, alpha / rank)
    return config


def _pairs(factors: dict, path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"block.0.attn.qkv": (A, B), ...} from the file's tensors; a lone factor is an error."""
    pairs = {}
    for name in factors:
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b") or module + (".lora_b" if kind == "lora_a" else ".lora_a") not in factors:
            raise GptOssError(f"{path}: tensor {name!r} is not half of a lora_a / lora_b pair")
        pairs[module] = (factors[module + ".lora_a"], factors[module + ".lora_b"])
    return pairs


def _held_factors(model, module_name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slices (see _factor_split) of the whole factors A and B of the update B A to a module's weight.
    Factors too small to slice are left as they are (the shape check names them)."""

    def held(t: torch.Tensor, kind: str) -> torch.Tensor:
        split = _factor_split(f"{module_name}.{kind}", t.dim(), model)
        if split is None or max(stop for _, stop in split[1]) > t.shape[split[0]]:
            return t
        dim, ranges = split
        return torch.cat([t.narrow(dim, start, stop - start) for start, stop in ranges], dim=dim)

    return held(a, "lora_a"), held(b, "lora_b")


def _target(model, module_name: str, a: torch.Tensor, b: torch.Tensor, path) -> nn.Module:
    """The Linear or DenseExperts that factors (A, B) update, their shapes checked."""
    try:
        target = model.get_submodule(module_name)
    except AttributeError:
        raise GptOssError(f"{path}: the model has no module {module_name!r} for its factors") from None
    if isinstance(target, nn.Linear):
        out_f, in_f = target.weight.shape
        expected = (out_f, a.shape[0]), (a.shape[0], in_f)
    elif isinstance(target, DenseExperts):
        e, out_f, in_f = target.weight.shape
        expected = (e, out_f, a.shape[1]), (e, a.shape[1], in_f)
    else:
        raise GptOssError(f"{path}: {module_name} holds MXFP4 experts, which cannot take a merged update: load the "
                          "model with dequantize=True (--dequantize)")
    if (tuple(b.shape), tuple(a.shape)) != expected:
        raise GptOssError(f"{path}: {module_name} factors have shapes B {tuple(b.shape)}, A {tuple(a.shape)}; the "
                          f"model needs B {expected[0]}, A {expected[1]}")
    return target


def _merge(target: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """weight += scale * B A, with the float32 product and the rounding of the training forward."""
    weight = target.weight
    a, b = a.to(weight.device), b.to(weight.device)
    if isinstance(target, nn.Linear):
        weight.copy_(_adapted(weight, a, b, scale))
    else:
        for e in range(weight.shape[0]):
            weight[e].copy_(_adapted(weight[e], a[e], b[e], scale))


def _shape(config) -> dict:
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_experts": config.num_experts, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}


def _check_targets(targets, where: str = "targets") -> None:
    if not targets or not all(t in TARGETS for t in targets):
        raise GptOssError(f"{where}: LoRA targets must be among {', '.join(TARGETS)}, got {targets!r}")
