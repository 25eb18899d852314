"""Triton MoE routing: top-K of the router logits and the softmax over those K, in one kernel; and, for many tokens,
the router's linear layer fused in front of it.

`route_triton` is gptoss.kernels.moe.route (torch.topk + torch.softmax, two launches and an index copy): a decode
step runs this once per layer after the gate's GEMV, so one launch instead of three matters. `router_triton` is
route(F.linear(x, weight, bias)) in one launch for a prefill's tokens, where cuBLAS takes two (a split-K GEMM
and its reduce) for the router's narrow output: each program multiplies a block of tokens by the whole (small)
gate weight on the tensor cores and selects their experts in registers. The logits are rounded to x's dtype
before the selection, as F.linear returns them. The K ids come out in descending logit order; among equal logits
the lowest expert id wins.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels import triton_interpreting
from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel


@triton.jit
def _top_k_softmax(x, e, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows of logits x (T, BLOCK_E) float32, -inf past the experts; e = arange(BLOCK_E) -> the top K's softmax
    weights (T, BLOCK_K) float32 (0 past K) and ids (T, BLOCK_K) int32: K passes of (max, first index of the max,
    mask it out)."""
    k = tl.arange(0, BLOCK_K)[None, :]
    top = tl.full((x.shape[0], BLOCK_K), -float("inf"), tl.float32)
    top_ids = tl.zeros((x.shape[0], BLOCK_K), tl.int32)
    for j in tl.static_range(K):
        m = tl.max(x, 1)[:, None]
        i = tl.min(tl.where(x == m, e[None, :], BLOCK_E), 1)[:, None]
        top = tl.where(k == j, m, top)
        top_ids = tl.where(k == j, i, top_ids)
        x = tl.where(e[None, :] == i, -float("inf"), x)
    p = tl.exp(top - tl.max(top, 1)[:, None])  # padding entries (k >= K) are exp(-inf) = 0
    return p / tl.sum(p, 1)[:, None], top_ids


@triton.jit
def _route_kernel(Logits, Weights, Ids, stride_l, E, K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    wait_for_prior_kernel(PDL)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(Logits + n * stride_l + e[None, :], mask=(e < E)[None, :], other=-float("inf")).to(tl.float32)
    p, top_ids = _top_k_softmax(x, e, K, BLOCK_E, BLOCK_K)  # (1, BLOCK_K) each
    k = tl.arange(0, BLOCK_K)[None, :]
    tl.store(Weights + n * K + k, p.to(Weights.dtype.element_ty), mask=k < K)
    tl.store(Ids + n * K + k, top_ids, mask=k < K)


@triton.jit
def _router_kernel(X, W, B, Weights, Ids, N, stride_x, E, H: tl.constexpr, K: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   F32: tl.constexpr, PDL: tl.constexpr):
    """route(F.linear(x, W, B), K) for BLOCK_T tokens: x (N, H), W (E, H), B (E,). F32: the products in float32
    (Triton's interpreter multiplies bf16 wrongly; float32 inputs must not round to tf32)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    t = t.to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    bias = tl.load(B + e, mask=emask, other=0.0).to(tl.float32)
    wait_for_prior_kernel(PDL)
    acc = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        x = tl.load(X + t[:, None] * stride_x + hs[None, :], mask=tmask[:, None] & hmask[None, :], other=0.0)
        w = tl.load(W + e[None, :] * H + hs[:, None], mask=emask[None, :] & hmask[:, None], other=0.0)  # (BH, BE)
        if F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    # the logits as F.linear returns them: float32 sums plus the bias, rounded once to x's dtype
    logits = (acc + bias[None, :]).to(X.dtype.element_ty).to(tl.float32)
    p, top_ids = _top_k_softmax(tl.where(emask[None, :], logits, -float("inf")), e, K, BLOCK_E, BLOCK_K)
    k = tl.arange(0, BLOCK_K)[None, :]
    mask = tmask[:, None] & (k < K)
    tl.store(Weights + t[:, None] * K + k, p.to(Weights.dtype.element_ty), mask=mask)
    tl.store(Ids + t[:, None] * K + k, top_ids, mask=mask)


def route_triton(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> weights (N, K) in the logits' dtype, expert ids (N, K) int32."""
    n, num_experts = router_logits.shape
    if not 0 < k <= num_experts:
        raise ValueError(f"k={k} must be in 1..{num_experts}")
    assert router_logits.stride(1) == 1
    weights = torch.empty((n, k), device=router_logits.device, dtype=router_logits.dtype)
    ids = torch.empty((n, k), device=router_logits.device, dtype=torch.int32)
    if n:
        pdl = pdl_enabled(router_logits)
        _route_kernel[(n,)](router_logits, weights, ids, router_logits.stride(0), num_experts, K=k,
                            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(k),
                            PDL=pdl, num_warps=1, launch_pdl=pdl)
    return weights, ids


# Tokens from which `router_triton` serves the router (fewer: the gate's GEMV or cuBLAS, then `route_triton`)
ROUTER_MIN_TOKENS = 256


def router_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H), weight (E, H), bias (E,) -> route(F.linear(x, weight, bias), k): weights (N, K) in x's dtype,
    expert ids (N, K) int32."""
    n, h = x.shape
    num_experts = weight.shape[0]
    if not 0 < k <= num_experts:
        raise ValueError(f"k={k} must be in 1..{num_experts}")
    if weight.shape != (num_experts, h) or bias.shape != (num_experts,) or x.stride(1) != 1:
        raise ValueError(f"router_triton: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    weight, bias = weight.contiguous(), bias.contiguous()
    weights = torch.empty((n, k), device=x.device, dtype=x.dtype)
    ids = torch.empty((n, k), device=x.device, dtype=torch.int32)
    if n:
        pdl = pdl_enabled(x)
        block_e = max(16, triton.next_power_of_2(num_experts))  # tl.dot's smallest tile side
        block_t = 16
        _router_kernel[(triton.cdiv(n, block_t),)](
            x, weight, bias, weights, ids, n, x.stride(0), num_experts, H=h, K=k, BLOCK_T=block_t, BLOCK_E=block_e,
            BLOCK_H=128 if block_e <= 32 else 64, BLOCK_K=triton.next_power_of_2(k),
            F32=x.dtype == torch.float32 or triton_interpreting(), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return weights, ids
