"""The gpt-oss transformer: the pure-PyTorch path that defines the numerics.

What is special about gpt-oss, against a plain GQA transformer:
- attention has one learned sink logit per query head (an extra softmax column with no value);
- even layers attend over a 128-token sliding window, odd layers over the whole prefix;
- RoPE is half-split with YaRN scaling (factor 32) and a concentration factor on cos and sin;
- the MLP is a top-4 MoE (softmax over the four chosen logits) of clamped, interleaved SwiGLU experts whose
  weights ship as MXFP4 and stay packed in memory; each expert has its own output bias;
- the unembedding is not tied to the embedding.

Module and parameter names equal the released `original/` checkpoint keys, so loading is a loop.
Tokens are a flat (N,) tensor with per-token positions: one sequence, or several packed by a batched engine.
Given a `Shard` (gptoss.parallel), each layer holds only its rank's heads, experts and vocabulary rows and sums or
gathers the ranks' partial results; the default is the whole model in one process.
A KV cache, when given, owns the attention over cached keys (`cache.attend`), so the same model runs with the
reference cache (gptoss.kv_cache), the GPU cache with Triton kernels, or the engine's paged cache. A GPU cache may
also offer `write_target`, through which the RoPE kernel stores the new k and v itself (a decode step's; a prefill
chunk's where the cache can take them before the attention).
On the GPU, small ops are fused where a decode step gains (see gptoss.kernels): the attention's residual add runs
in the MLP's norm, the MLP's in the MoE's last kernel, and the norms before qkv and the unembedding in their GEMVs.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gptoss.config import RMS_NORM_EPS, ModelConfig
from gptoss.experts import DenseExperts, MXFP4Experts
from gptoss.kernels import use_triton
from gptoss.kernels.attention import attention_mask, sink_attention
from gptoss.kernels.attention_training import sink_attention_blocked
from gptoss.kernels.moe import moe, moe_partial, route
from gptoss.parallel import SINGLE, Shard


class RMSNorm(nn.Module):
    """Statistics and gain in float32, output in the input's dtype."""

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x, self.scale):
            from gptoss.kernels.norm_triton import rms_norm

            return rms_norm(x, self.scale, RMS_NORM_EPS)
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + RMS_NORM_EPS)
        return (t * self.scale).to(x.dtype)


def linear(layer: nn.Linear, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
    """layer(norm(x)), or layer(x) without a norm. A few tokens on the GPU take the Triton GEMV, which reads the
    weight once in one launch and applies the norm itself."""
    weight, norm_scale = layer.weight, None if norm is None else norm.scale
    if use_triton(x, weight, *[t for t in (layer.bias, norm_scale) if t is not None]):
        from gptoss.kernels.linear_triton import GEMV_MAX_TOKENS, gemv

        if x.shape[0] <= GEMV_MAX_TOKENS and weight.is_contiguous():
            return gemv(x, weight, layer.bias, norm_scale=norm_scale, eps=RMS_NORM_EPS)
    return F.linear(x if norm is None else norm(x), weight, layer.bias)  # the weight read once (a LoRA adds to it)


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN: per-frequency blend of interpolated (1/(factor*freq)) and original (1/freq) inverse frequencies,
    and the concentration that scales cos and sin. The ramp bounds are NOT rounded."""
    half = config.head_dim // 2
    freq = config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    factor = config.rope_scaling_factor
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    ctx = config.initial_context_length
    low = half * math.log(ctx / (config.rope_ntk_beta * 2 * math.pi)) / math.log(config.rope_theta)
    high = half * math.log(ctx / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(config.rope_theta)
    ramp = ((torch.arange(half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp
    inv_freq = (1.0 / (factor * freq)) * ramp + (1.0 / freq) * keep_original
    return inv_freq, concentration


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2, device=device), persistent=False)
        self.reset_buffers()

    def reset_buffers(self):
        inv_freq, self.concentration = yarn_inv_freq(self.config)
        if self.inv_freq.device.type != "meta":
            self.inv_freq.copy_(inv_freq)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) -> cos, sin (N, D/2) in float32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.concentration, freqs.sin() * self.concentration


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D); element i pairs with i + D/2 (half-split, not interleaved)."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class AttentionBlock(nn.Module):
    """Sink attention over this shard's heads: all of them in one process, else its share of the KV heads with
    the query heads that read them."""

    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=torch.bfloat16, shard: Shard = SINGLE):
        super().__init__()
        self.layer_idx = layer_idx
        self.shard = shard
        kv_start, kv_stop = shard.part(config.num_key_value_heads, "num_key_value_heads")
        self.n_kv_heads = kv_stop - kv_start
        self.n_heads = self.n_kv_heads * (config.num_attention_heads // config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.window = config.layer_window(layer_idx)
        self.sm_scale = 1.0 / math.sqrt(config.head_dim)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.norm = RMSNorm(config.hidden_size, device=device)
        self.qkv = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, device=device, dtype=dtype)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads, device=device, dtype=dtype))
        self.out = nn.Linear(q_dim, config.hidden_size, device=device, dtype=dtype)

    def forward(self, x, positions, cos, sin, cache=None):
        """x (N, H) -> the attention's update (N, H); the residual add is the MLP block's (see MLPBlock)."""
        n = x.shape[0]
        qkv = linear(self.qkv, self.shard.enter(x), self.norm)  # (N, q_dim + 2 kv_dim): rows q | k | v
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        v = qkv[:, q_dim + kv_dim :].view(n, self.n_kv_heads, self.head_dim)
        if use_triton(qkv, self.sinks):  # one kernel rotates q and k, and stores k and v where the cache lets it
            from gptoss.kernels.attention_triton import rope_and_cache_write

            write_target = getattr(cache, "write_target", None)  # optional part of the cache protocol
            target = write_target(self.layer_idx, positions) if write_target else None
            q, k = rope_and_cache_write(qkv, cos, sin, self.n_heads, self.n_kv_heads, *(target or ()))
            if target is not None:
                k = v = None  # already in the cache
        else:
            q = apply_rope(qkv[:, :q_dim].view(n, self.n_heads, self.head_dim), cos, sin)
            k = apply_rope(qkv[:, q_dim : q_dim + kv_dim].view(n, self.n_kv_heads, self.head_dim), cos, sin)
        if cache is None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, self.sinks)):
            # training: the same function without keeping the (heads, N, N) probabilities for the backward
            o = sink_attention_blocked(q, k, v, self.sinks, positions, self.window, self.sm_scale)
        elif cache is None:
            o = sink_attention(q, k, v, self.sinks, attention_mask(positions, positions, self.window), self.sm_scale)
        else:  # the cache stores k/v and runs attention over everything the queries may see
            o = cache.attend(self.layer_idx, q, k, v, positions, self.window, self.sinks, self.sm_scale)  # (N, Hq, D)
        if self.shard.parallel:  # each rank's heads give a partial product; the bias is added once, after the sum
            return self.shard.sum(F.linear(o.reshape(n, q_dim), self.out.weight)) + self.out.bias
        return linear(self.out, o.reshape(n, q_dim))


class MLPBlock(nn.Module):
    """The MoE over this shard's experts (all of them in one process); the router always sees every expert."""

    def __init__(self, config: ModelConfig, device=None, dtype=torch.bfloat16, expert_format: str = "mxfp4",
                 shard: Shard = SINGLE):
        super().__init__()
        self.experts_per_token = config.experts_per_token
        self.swiglu_limit = config.swiglu_limit
        self.shard = shard
        self.first_expert, last = shard.part(config.num_experts, "num_experts")
        e, h, i = last - self.first_expert, config.hidden_size, config.intermediate_size
        self.norm = RMSNorm(h, device=device)
        self.gate = nn.Linear(h, config.num_experts, device=device, dtype=dtype)
        if expert_format == "mxfp4":
            self.mlp1_weight = MXFP4Experts(e, 2 * i, h, device=device)
            self.mlp2_weight = MXFP4Experts(e, h, i, device=device)
        elif expert_format == "dense":
            self.mlp1_weight = DenseExperts(e, 2 * i, h, device=device, dtype=dtype)
            self.mlp2_weight = DenseExperts(e, h, i, device=device, dtype=dtype)
        else:
            raise ValueError(f"expert_format must be 'mxfp4' or 'dense', got {expert_format!r}")
        self.mlp1_bias = nn.Parameter(torch.zeros(e, 2 * i, device=device, dtype=dtype))
        self.mlp2_bias = nn.Parameter(torch.zeros(e, h, device=device, dtype=dtype))

    def forward(self, x, update):
        """x: the block's input; update: the attention's output. Returns h + MoE(norm(h)) with h = x + update:
        taking the attention's residual add here lets the GPU path fuse it into the norm."""
        if (isinstance(self.mlp1_weight, MXFP4Experts)
                and use_triton(x, update, self.norm.scale, self.gate.weight, self.mlp1_bias, self.mlp2_bias)):
            return self._forward_gpu(x, update)
        h = x + update
        t = self.norm(h)
        weights, expert_ids = route(self.gate(t), self.experts_per_token)  # (N, K) each
        experts = (self.mlp1_weight, self.mlp1_bias, self.mlp2_weight, self.mlp2_bias, self.swiglu_limit)
        if self.shard.parallel:
            partial = moe_partial(self.shard.enter(t), self.shard.enter(weights), expert_ids, *experts,
                                  first_expert=self.first_expert)
            return self._add_shares(h, partial)
        return h + moe(t, weights, expert_ids, *experts)

    def _add_shares(self, h: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """h + the MoE output from this rank's experts' float32 share: summed over the ranks in float32, as moe()
        sums, then rounded."""
        return h + self.shard.sum(partial).to(h.dtype)

    def _forward_gpu(self, x, update):
        """The same with packed experts on the GPU in a few launches: residual add + norm, the gate GEMV, top-K +
        softmax, and the MoE kernels, whose last one adds h (in one process; a shard adds the ranks' sum)."""
        from gptoss.kernels.moe_triton import gemv_serves, moe_triton_from_stores
        from gptoss.kernels.norm_triton import add_rms_norm
        from gptoss.kernels.route_triton import route_triton

        h, t, t_float32 = add_rms_norm(x, update, self.norm.scale, RMS_NORM_EPS,
                                       with_float32=gemv_serves(x.shape[0]))  # for the MoE GEMV kernels
        weights, expert_ids = route_triton(linear(self.gate, t), self.experts_per_token)
        experts = (self.mlp1_weight, self.mlp1_bias, self.mlp2_weight, self.mlp2_bias, self.swiglu_limit)
        if self.shard.parallel:
            partial = moe_triton_from_stores(t, weights, expert_ids, *experts, x_float32=t_float32,
                                             first_expert=self.first_expert, num_experts=self.gate.out_features)
            return self._add_shares(h, partial)
        return moe_triton_from_stores(t, weights, expert_ids, *experts, residual=h, x_float32=t_float32)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=torch.bfloat16, expert_format="mxfp4",
                 shard: Shard = SINGLE):
        super().__init__()
        self.attn = AttentionBlock(config, layer_idx, device=device, dtype=dtype, shard=shard)
        self.mlp = MLPBlock(config, device=device, dtype=dtype, expert_format=expert_format, shard=shard)

    def forward(self, x, positions, cos, sin, cache=None):
        return self.mlp(x, self.attn(x, positions, cos, sin, cache))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, *, device=None, dtype=torch.bfloat16, expert_format: str = "mxfp4",
                 shard: Shard = SINGLE):
        super().__init__()
        shard.check(config)
        self.config = config
        self.expert_format = expert_format
        self.shard = shard
        self.vocab_start, vocab_stop = shard.part(config.vocab_size, "vocab_size")
        vocab = vocab_stop - self.vocab_start
        self.embedding = nn.Embedding(vocab, config.hidden_size, device=device, dtype=dtype)
        self.block = nn.ModuleList(
            TransformerBlock(config, i, device=device, dtype=dtype, expert_format=expert_format, shard=shard)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, device=device)
        self.unembedding = nn.Linear(config.hidden_size, vocab, bias=False, device=device, dtype=dtype)
        self.rope = RotaryEmbedding(config, device=device)
        # recompute each block in the backward pass instead of keeping its activations (attention scores are
        # (heads, N, N) a layer in the pure path): training memory of one block at a time
        self.gradient_checkpointing = False
        self.lora_config: dict | None = None  # the adapters gptoss.lora.add_lora put on it
        self.lora_replicated: list[nn.Parameter] = []  # those of their factors every rank of a shard group holds

    @property
    def local_config(self) -> ModelConfig:
        """The config as this shard's attention sees it (its share of the heads): what its KV caches hold."""
        attn = self.block[0].attn
        return dataclasses.replace(self.config, num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_kv_heads)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (N,) -> logits (N, V). Without a cache the tokens are one sequence at positions 0..N-1;
        with one, `positions` says where each token sits (see gptoss.kv_cache).
        logits_rows (R,): compute logits only for these rows -> (R, V) (a prefill needs only its last row)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        if positions is None:
            positions = torch.arange(tokens.shape[0], device=tokens.device)
        cos, sin = self.rope(positions)
        x = self._embed(tokens)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.block:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, positions, cos, sin, cache, use_reentrant=False)
            else:
                x = block(x, positions, cos, sin, cache)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.shard.cat_last(linear(self.unembedding, self.shard.enter(x), self.norm))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.shard.parallel:
            return self.embedding(tokens)
        local = tokens - self.vocab_start  # rows this rank holds; the others contribute zeros to the sum
        held = (local >= 0) & (local < self.embedding.num_embeddings)
        return self.shard.sum(torch.where(held[:, None], self.embedding(torch.where(held, local, 0)), 0))

    @classmethod
    def from_checkpoint(cls, path, device="cpu", **kwargs) -> "Transformer":
        """Loads either released layout (see gptoss.checkpoint.load_model for the options)."""
        from gptoss.checkpoint import load_model

        return load_model(path, device=device, **kwargs)
