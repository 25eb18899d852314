"""Mixture of experts: routing, clamped SwiGLU and the expert MLPs — the pure-PyTorch reference.

Shapes: N tokens, H hidden, I per-expert intermediate, E experts, K experts per token.
mlp1 produces 2I outputs with the SwiGLU halves interleaved (row 2j gates unit j, row 2j+1 is its linear part).
"""

import torch
import torch.nn.functional as F

SWIGLU_ALPHA = 1.702


def route(router_logits: torch.Tensor, k: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> weights (N, K) and expert ids (N, K): top-K first, then softmax over those K.
    The order of the K only changes the order of the weighted sum; sorted=False skips a sort kernel."""
    top = torch.topk(router_logits, k=k, dim=-1, sorted=sorted)
    return torch.softmax(top.values, dim=-1), top.indices


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """h (..., 2I) interleaved -> (..., I): glu * sigmoid(1.702 glu) * (lin + 1), glu clamped above, lin both ways."""
    glu = h[..., ::2].clamp(max=limit)
    lin = h[..., 1::2].clamp(min=-limit, max=limit)
    return glu * torch.sigmoid(SWIGLU_ALPHA * glu) * (lin + 1)


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    mlp1_weight,
    mlp1_bias: torch.Tensor,
    mlp2_weight,
    mlp2_bias: torch.Tensor,
    swiglu_limit: float,
) -> torch.Tensor:
    """x (N, H), routing weights/ids (N, K) -> sum_k w_k * expert_k(x) as (N, H) in x's dtype.

    mlp1_weight / mlp2_weight are expert weight stores (see gptoss.experts) whose `expert(e, dtype)` gives one
    expert's dense matrix, (2I, H) and (H, I): each used expert is materialized once, never the whole set.
    """
    return moe_partial(x, weights, expert_ids, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias, swiglu_limit).to(x.dtype)


def moe_partial(x, weights, expert_ids, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias, swiglu_limit: float,
                first_expert: int = 0) -> torch.Tensor:
    """moe()'s sum in float32 over the pairs routed to the experts the stores hold: global ids first_expert ..
    first_expert + len(mlp1_bias) - 1 (an expert-parallel shard; all of them by default)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    held = range(first_expert, first_expert + mlp1_bias.shape[0])
    for e in torch.unique(expert_ids).tolist():
        if e not in held:
            continue
        token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        local = e - first_expert
        h = F.linear(x[token_idx], mlp1_weight.expert(local, x.dtype), mlp1_bias[local])  # (n_e, 2I)
        y = F.linear(swiglu(h, swiglu_limit), mlp2_weight.expert(local, x.dtype), mlp2_bias[local])  # (n_e, H)
        out.index_add_(0, token_idx, y.float() * weights[token_idx, slot, None].float())
    return out
