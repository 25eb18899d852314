"""Triton exponential race: a batch of rows sampled in one kernel that reads the logits once.

Row r picks argmax_i (logits[r, i] * inv_temperature - log E_i) with E_i ~ Exp(1) drawn from Philox keyed by
(seeds[r], draws[r], i): token i wins with probability softmax(logits[r] * inv_temperature)_i (see gptoss.sampling,
whose torch reference draws its E from torch generators instead: another stream, the same distribution).
One program per row streams the row in BLOCK-wide steps; no softmax, no noise tensor, no host sync.
"""

import torch
import triton
import triton.language as tl

_TWO_TO_MINUS_32 = tl.constexpr(2.0**-32)


@triton.jit
def _exponential(bits):
    """uint32 Philox bits -> Exp(1) samples as float32: -log(1 - v) with v = bits / 2^32, by its series where
    1 - v would lose v's bits (the smallest E decide the race), never 0."""
    v = bits.to(tl.float32) * _TWO_TO_MINUS_32
    e = tl.where(v < 0.0009765625, v * (1.0 + 0.5 * v), -tl.log(1.0 - v))
    return tl.maximum(e, 1e-12)


@triton.jit
def _race_kernel(Logits, Seeds, Draws, Out, V, stride, inv_temperature, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(Seeds + row)
    counter_hi = tl.load(Draws + row).to(tl.int64) << 32  # Philox counter: (token id, draw)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        logit = tl.load(Logits + row.to(tl.int64) * stride + cols, mask=cols < V, other=float("-inf"))
        e = _exponential(tl.randint(seed, counter_hi + cols))
        score = logit.to(tl.float32) * inv_temperature - tl.log(e)
        better = score > best  # strict: the lowest id among equal scores stays
        best = tl.where(better, score, best)
        best_id = tl.where(better, cols, best_id)
    top = tl.max(best, 0)
    tl.store(Out + row, tl.min(tl.where(best == top, best_id, V), 0).to(tl.int64))


def exponential_race(logits: torch.Tensor, inv_temperature: float, seeds: torch.Tensor,
                     draws: torch.Tensor) -> torch.Tensor:
    """logits (B, V) of any float dtype, seeds / draws (B,) int64 on its device -> token ids (B,) int64."""
    batch, vocab = logits.shape
    assert logits.stride(1) == 1 and seeds.shape == draws.shape == (batch,)
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    if batch:
        _race_kernel[(batch,)](logits, seeds, draws, out, vocab, logits.stride(0), float(inv_temperature),
                               BLOCK=2048, num_warps=8)
    return out
