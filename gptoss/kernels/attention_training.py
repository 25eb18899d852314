"""Sink attention for training without the (heads, N, N) probabilities: query blocks, a saved log-sum-exp and a
backward pass that recomputes each block's probabilities (flash attention's scheme, in PyTorch).

The function is the reference's (gptoss.kernels.attention.sink_attention): scores and softmax in float32, the
sink an extra softmax column with no value. Memory holds one block's (heads, B, N) scores at a time instead of
the whole (heads, N, N) in the forward and again in the backward. Gradients (float32 sums, rounded to the inputs'
dtypes), with P the probabilities, O the output, dO its gradient and D = rowsum(dO * O):
  dV = P^T dO;  dS = P * (dO V^T - D);  dQ = scale dS K;  dK = scale dS^T Q;  dsink = -sum_n p_sink(n) D(n)
(the sink's value is zero, so its column contributes only through the normalization).
"""

from __future__ import annotations

import torch

from gptoss.kernels.attention import attention_mask

BLOCK = 512  # query rows a step: (heads, 512, N) float32 scores, 1 GB for 64 heads at N = 8k


def _grouped(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(N, Hq, D) -> (N, Hkv, G, D) float32: query head h reads KV head h // G."""
    n, hq, d = x.shape
    return x.float().view(n, n_kv_heads, hq // n_kv_heads, d)


def _block_logits(qg, k, sinks, positions, rows, window, sm_scale):
    """Scores (Hkv, G, B, S) of query rows `rows` (masked to -inf) and the sink logits (Hkv, G, B, 1)."""
    scores = torch.einsum("nhgd,shd->hgns", qg[rows], k) * sm_scale
    scores = scores.masked_fill(~attention_mask(positions[rows], positions, window), float("-inf"))
    hkv, g = scores.shape[:2]
    return scores, sinks.float().view(hkv, g, 1, 1).expand(-1, -1, scores.shape[2], 1)


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, positions, window, sm_scale):
        n, hq, d = q.shape
        hkv = k.shape[1]
        qg, kf, vf = _grouped(q, hkv), k.float(), v.float()
        out = torch.empty(n, hkv, hq // hkv, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(hkv, hq // hkv, n, dtype=torch.float32, device=q.device)  # log-sum-exp incl. the sink
        for start in range(0, n, BLOCK):
            rows = slice(start, min(start + BLOCK, n))
            scores, sink = _block_logits(qg, kf, sinks, positions, rows, window, sm_scale)
            logits = torch.cat((scores, sink), dim=-1)
            lse[:, :, rows] = torch.logsumexp(logits, dim=-1)
            probs = torch.exp(scores - lse[:, :, rows, None])
            out[rows] = torch.einsum("hgns,shd->nhgd", probs, vf)
        ctx.save_for_backward(q, k, v, sinks, positions, out, lse)
        ctx.window, ctx.sm_scale = window, sm_scale
        return out.reshape(n, hq, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, positions, out, lse = ctx.saved_tensors
        window, sm_scale = ctx.window, ctx.sm_scale
        n, hq, d = q.shape
        hkv = k.shape[1]
        qg, kf, vf = _grouped(q, hkv), k.float(), v.float()
        dog = _grouped(grad_out, hkv)  # (N, Hkv, G, D)
        delta = (dog * out).sum(-1).permute(1, 2, 0)  # (Hkv, G, N): rowsum(dO * O)
        dq = torch.empty_like(qg)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        dsinks = torch.zeros(hkv, hq // hkv, dtype=torch.float32, device=q.device)
        for start in range(0, n, BLOCK):
            rows = slice(start, min(start + BLOCK, n))
            scores, sink = _block_logits(qg, kf, sinks, positions, rows, window, sm_scale)
            block_lse = lse[:, :, rows, None]
            probs = torch.exp(scores - block_lse)  # (Hkv, G, B, S)
            p_sink = torch.exp(sink - block_lse)[..., 0]  # (Hkv, G, B)
            dv += torch.einsum("hgns,nhgd->shd", probs, dog[rows])
            dp = torch.einsum("nhgd,shd->hgns", dog[rows], vf)
            ds = probs * (dp - delta[:, :, rows, None])
            dq[rows] = torch.einsum("hgns,shd->nhgd", ds, kf) * sm_scale
            dk += torch.einsum("hgns,nhgd->shd", ds, qg[rows]) * sm_scale
            dsinks -= (p_sink * delta[:, :, rows]).sum(-1)
        return (dq.reshape(n, hq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dsinks.reshape(hq).to(sinks.dtype), None, None, None)


def sink_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                           positions: torch.Tensor, window: int | None, sm_scale: float) -> torch.Tensor:
    """One sequence's self-attention (queries and keys at `positions`), as sink_attention(q, k, v, sinks,
    attention_mask(positions, positions, window), sm_scale) computes it, in query blocks with the backward
    above: q (N, Hq, D), k/v (N, Hkv, D), sinks (Hq,) -> (N, Hq, D) in q's dtype."""
    return _SinkAttention.apply(q, k, v, sinks, positions, window, sm_scale)
