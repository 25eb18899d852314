"""Tensor and expert parallelism over torch.distributed: which slice of each weight a rank holds, and the
collectives that put the ranks' partial results together.

The split, for W ranks (gpt-oss: W in 1, 2, 4, 8):
- attention (tensor parallel): rank r holds query heads [r Hq/W, (r+1) Hq/W) and the KV heads they read (GQA
  groups stay whole, so Hkv must divide by W): its rows of qkv, its sinks, its columns of the output projection,
  whose partial products are summed over the ranks before the bias;
- MoE (expert parallel): the router is replicated, so every rank routes every token alike; rank r holds experts
  [r E/W, (r+1) E/W) and computes only the (token, expert) pairs routed to them; the partial sums, float32 as the
  single-process MoE accumulates them, are summed over the ranks;
- embedding and unembedding: split by vocabulary rows; a token's embedding comes from the rank that holds it, and
  every rank gathers the whole logits row, so that all sample the same token;
- norms: replicated.
Each rank loads only its slices of the checkpoint (gptoss.checkpoint reads them with safetensors' get_slice).

Training (gptoss.lora on a sharded model): every rank computes the same loss, so the collectives differentiate as
in Megatron-LM: a sum over the ranks passes its gradient through unchanged (each rank's partial result feeds the
same total); a replicated tensor that enters a rank's part of the model (`Shard.enter`: the attention's and the
unembedding's input, the MoE's input and routing weights) gets the sum of the ranks' gradients; a gathered
tensor gives each rank its own slice of the gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch

from gptoss.config import ModelConfig
from gptoss.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place in a tensor/expert-parallel group (world_size 1: the whole model, no collectives)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None means the default group

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def part(self, total: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `total` items."""
        if total % self.world_size:
            raise ConfigError(f"{what} ({total}) cannot be split evenly over {self.world_size} ranks")
        size = total // self.world_size
        return self.rank * size, (self.rank + 1) * size

    def check(self, config: ModelConfig) -> None:
        """ConfigError unless every split of this module's scheme is even for `config`."""
        self.part(config.num_key_value_heads, "num_key_value_heads")
        self.part(config.num_experts, "num_experts")
        self.part(config.vocab_size, "vocab_size")

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of x over the ranks (x itself on one rank); x is a fresh intermediate, summed in
        place where autograd does not record it."""
        if not self.parallel:
            return x
        if x.requires_grad:
            return _SumOverRanks.apply(x, self.group)
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """x, replicated on every rank, as it enters this rank's part of the model: the same tensor, whose gradient
        (where autograd records it) is the sum of the ranks' gradients."""
        if self.parallel and x.requires_grad:
            return _EnterShard.apply(x, self.group)
        return x

    def from_first(self, value: int, device: str | torch.device) -> int:
        """Rank 0's value of an int64 (a random seed, say) on every rank."""
        if not self.parallel:
            return value
        return int(self.tensor_from_first(torch.tensor([value], dtype=torch.int64, device=device)))

    def tensor_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (the others pass a tensor of the same shape and dtype to receive it)."""
        if self.parallel:
            torch.distributed.broadcast(x, src=self._first(), group=self.group)
        return x

    def object_from_first(self, obj):
        """Rank 0's picklable obj (a line of user input, say) on every rank."""
        if not self.parallel:
            return obj
        held = [obj]
        torch.distributed.broadcast_object_list(held, src=self._first(), group=self.group)
        return held[0]

    def _first(self) -> int:
        """The global rank of the group's rank 0 (what broadcasts take as src)."""
        return torch.distributed.get_global_rank(self._group(), 0)

    def _group(self):
        return self.group or torch.distributed.group.WORLD

    def cat_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x concatenated in rank order along the last dimension."""
        if not self.parallel:
            return x
        if x.requires_grad:
            return _GatherLast.apply(x, self)
        return torch.cat(self.gather(x), dim=-1)

    def gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape on all), in rank order."""
        if not self.parallel:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return parts


class _SumOverRanks(torch.autograd.Function):
    """The ranks' partial results summed; its gradient passes to each partial unchanged (every rank computes the
    same loss from the same sum)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _EnterShard(torch.autograd.Function):
    """A replicated tensor entering a rank's part of the model: itself; its gradient the ranks' gradients summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherLast(torch.autograd.Function):
    """The ranks' x concatenated along the last dimension; the gradient of this rank's x is its own slice."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.start, ctx.width = shard.rank * x.shape[-1], x.shape[-1]
        return torch.cat(shard.gather(x), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.start, ctx.width).contiguous(), None


SINGLE = Shard()


@contextlib.contextmanager
def joined(device: str | torch.device) -> Iterator[Shard]:
    """Under torchrun (WORLD_SIZE > 1): joins the default process group (NCCL on CUDA, gloo on the CPU) for the
    block and yields this rank's Shard, then leaves it; yields SINGLE otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        yield Shard(dist.get_rank(), dist.get_world_size())
        dist.barrier()  # leave together: a rank tearing gloo down while another still talks to it can abort
    finally:
        dist.destroy_process_group()


def local_device(device: str | torch.device) -> torch.device:
    """A CUDA device given without an index means this rank's GPU (LOCAL_RANK) under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def held_ranges(key: str, config: ModelConfig, shard: Shard) -> tuple[int, list[tuple[int, int]]] | None:
    """For a model state key (original-layout name): (dim, ranges) when a rank holds slices of it, the ranges of
    the full tensor's indices along dim that it holds, in the order it stores them; None when it is replicated."""
    if not shard.parallel:
        return None
    name = key.split(".")
    if key in ("embedding.weight", "unembedding.weight"):
        return 0, [shard.part(config.vocab_size, "vocab_size")]
    if name[-2:] in (["qkv", "weight"], ["qkv", "bias"]):
        heads = _head_ranges(config, shard)
        q, kv = config.q_dim, config.kv_dim
        return 0, [heads["q"], (q + heads["kv"][0], q + heads["kv"][1]), (q + kv + heads["kv"][0], q + kv + heads["kv"][1])]
    if name[-1] == "sinks":
        start, stop = _head_ranges(config, shard)["q"]
        return 0, [(start // config.head_dim, stop // config.head_dim)]
    if name[-2:] == ["out", "weight"]:
        return 1, [_head_ranges(config, shard)["q"]]
    if name[-2] in ("mlp1_weight", "mlp2_weight") or name[-1] in ("mlp1_bias", "mlp2_bias"):
        return 0, [shard.part(config.num_experts, "num_experts")]
    return None


def _head_ranges(config: ModelConfig, shard: Shard) -> dict[str, tuple[int, int]]:
    """This rank's rows of q and of k (and v) within each, in features (heads * head_dim)."""
    kv_start, kv_stop = shard.part(config.num_key_value_heads, "num_key_value_heads")
    group = config.num_attention_heads // config.num_key_value_heads
    d = config.head_dim
    return {"q": (kv_start * group * d, kv_stop * group * d), "kv": (kv_start * d, kv_stop * d)}
