"""The MoE router in one Triton kernel for decode-sized batches: logits = t @ W^T + b, top-K, softmax over the K.

Replaces a GEMV, cuBLAS's split-K reduction, top-k and softmax (four launches per layer) by one. The logits are
rounded to the activation dtype before the top-k, as the reference (gptoss.kernels.moe.route over nn.Linear) does,
so both pick the same experts for the same input.
"""

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64  # above this a GEMM + topk is cheaper than one program re-reading W per token


@triton.jit
def _router_kernel(T, W, B, Weights, Ids, stride_t, n_experts, hidden,
                   K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < n_experts
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        in_range = cols < hidden
        t = tl.load(T + token * stride_t + cols, mask=in_range, other=0.0).to(tl.float32)
        w = tl.load(W + experts[:, None] * hidden + cols[None, :], mask=valid[:, None] & in_range[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * t[None, :], axis=1)
    bias = tl.load(B + experts, mask=valid, other=0.0).to(tl.float32)
    logits = (acc + bias).to(T.dtype.element_ty).to(tl.float32)  # rounded like nn.Linear's output
    logits = tl.where(valid, logits, float("-inf"))
    # top-K by repeated arg-max (the lowest index wins a tie, as torch.topk does), then softmax over the K
    slots = tl.arange(0, BLOCK_K)
    top_values = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    top_ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.max(logits, axis=0)
        index = tl.min(tl.where(logits == best, experts, BLOCK_E), axis=0)
        top_values = tl.where(slots == k, best, top_values)
        top_ids = tl.where(slots == k, index.to(tl.int64), top_ids)
        logits = tl.where(experts == index, float("-inf"), logits)
    probs = tl.exp(top_values - tl.max(top_values, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    tl.store(Weights + token * K + slots, probs, mask=slots < K)
    tl.store(Ids + token * K + slots, top_ids, mask=slots < K)


def route_triton(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int):
    """t (N, H), router weight (E, H) and bias (E,) -> routing weights (N, K) in t's dtype and expert ids (N, K)."""
    n_tokens, hidden = t.shape
    n_experts = weight.shape[0]
    weights = torch.empty(n_tokens, k, device=t.device, dtype=torch.float32)
    ids = torch.empty(n_tokens, k, device=t.device, dtype=torch.int64)
    _router_kernel[(n_tokens,)](t, weight, bias, weights, ids, t.stride(0), n_experts, hidden,
                                K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(n_experts),
                                BLOCK_H=256, num_warps=8)
    return weights.to(t.dtype), ids
