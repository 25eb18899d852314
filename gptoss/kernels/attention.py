"""Attention with sinks, GQA and an optional sliding window: the pure-PyTorch reference.

gpt-oss gives every query head one learned "sink" logit that joins the softmax denominator as an extra column
with no value, so a head can attend to nothing: p_j = exp(s_j) / (exp(sink) + sum_i exp(s_i)).
"""

import torch


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may see: (N,) query and (S,) key positions -> (N, S) bool.

    Causal; with a window, query q sees keys q-window+1 .. q; keys at negative positions are empty cache slots;
    with sequence ids, queries see only keys of their own sequence.
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    visible = (k <= q) & (k >= 0)
    if window is not None:
        visible &= q - k < window
    if q_seq is not None:
        visible &= q_seq[:, None] == k_seq[None, :]
    return visible


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, mask: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """q (N, Hq, D), k/v (S, Hkv, D), sinks (Hq,), mask (N, S) bool -> (N, Hq, D) in q's dtype.

    Query head h reads KV head h // (Hq // Hkv). Scores and softmax run in float32.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    q_per_kv = n_heads // n_kv_heads
    qg = q.float().view(n_tokens, n_kv_heads, q_per_kv, head_dim)  # (N, Hkv, G, D)
    scores = torch.einsum("nhgd,shd->hgns", qg, k.float()) * sm_scale  # (Hkv, G, N, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_logits = sinks.float().view(n_kv_heads, q_per_kv, 1, 1).expand(-1, -1, n_tokens, 1)
    probs = torch.softmax(torch.cat((scores, sink_logits), dim=-1), dim=-1)[..., :-1]  # drop the sink column
    out = torch.einsum("hgns,shd->nhgd", probs, v.float())  # (N, Hkv, G, D)
    return out.reshape(n_tokens, n_heads, head_dim).to(q.dtype)
