"""Triton MoE routing: top-K of the router logits and the softmax over those K, in one kernel.

Same function as gptoss.kernels.moe.route (torch.topk + torch.softmax, two launches and an index copy): a decode
step runs this once per layer, so one launch instead of three matters. The K ids come out in descending logit
order; among equal logits the lowest expert id wins.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel


@triton.jit
def _route_kernel(Logits, Weights, Ids, stride_l, E, K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    wait_for_prior_kernel(PDL)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(Logits + n * stride_l + e, mask=e < E, other=-float("inf")).to(tl.float32)
    k = tl.arange(0, BLOCK_K)
    top = tl.full((BLOCK_K,), -float("inf"), tl.float32)
    top_ids = tl.zeros((BLOCK_K,), tl.int32)
    for j in tl.static_range(K):  # K passes of (max, first index of the max, mask it out)
        m = tl.max(x, 0)
        i = tl.min(tl.where(x == m, e, BLOCK_E), 0)
        top = tl.where(k == j, m, top)
        top_ids = tl.where(k == j, i, top_ids)
        x = tl.where(e == i, -float("inf"), x)
    p = tl.exp(top - tl.max(top, 0))  # padding entries (k >= K) are exp(-inf) = 0
    p = p / tl.sum(p, 0)
    tl.store(Weights + n * K + k, p.to(Weights.dtype.element_ty), mask=k < K)
    tl.store(Ids + n * K + k, top_ids, mask=k < K)


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
