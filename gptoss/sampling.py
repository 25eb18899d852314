"""Token sampling on the device, without a host sync: temperature, top-k, top-p, seeded generators."""

from collections.abc import Sequence

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.
    generator: one for the whole batch, or one per row (None: the default generator), so that a batch of seeded
    requests samples in one call and each row draws exactly what it would draw alone."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) samples from p without a sync
    return (probs / _exponential_noise(probs, generator)).argmax(dim=-1)


def _exponential_noise(probs: torch.Tensor, generator) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty_like(probs).exponential_(1, generator=generator)
    noise = torch.empty_like(probs)
    if any(g is None for g in generator):
        noise.exponential_(1)
    for row, g in zip(noise, generator, strict=True):
        if g is not None:
            row.exponential_(1, generator=g)
    return noise
