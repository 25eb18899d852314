"""Triton exponential race: a batch of rows sampled by a kernel that reads the logits once (and a small one after).

Row r picks argmax_i (logits[r, i] * inv_temperature[r] - log E_i) with E_i ~ Exp(1) drawn from Philox keyed by
(seeds[r], draws[r], i), over the i whose scaled logit reaches floors[r] (its top-k / top-p filters): token i wins
with probability softmax(logits[r] * inv_temperature[r])_i renormalized over those (see gptoss.sampling, whose torch
reference draws its E from torch generators instead: another stream, the same distribution). A row with
inv_temperature 0 picks its argmax.
Each row is split into chunks of CHUNK columns, one program a chunk, whose winners a second small kernel compares
(rows of one chunk skip it); no softmax, no noise tensor, no host sync.
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
def _keyed_noise(seed, draw, cols):
    """-log E for E ~ Exp(1) keyed by (seed, draw, token id): Philox with the seed as key and (token id, draw) as
    its counter, so a row's noise depends on nothing else in the batch."""
    return -tl.log(_exponential(tl.randint(seed, (draw.to(tl.int64) << 32) + cols)))


@triton.jit
def _winner(scores, ids, V):
    """The best of scores and the lowest of the ids that reach it."""
    top = tl.max(scores, 0)
    return top, tl.min(tl.where(scores == top, ids, V), 0)


@triton.jit
def _race_kernel(Logits, InvTemperature, Floors, Seeds, Draws, Out, Scores, Ids, V, stride, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, SINGLE: tl.constexpr, FLOORS: tl.constexpr):
    """Program (row, c) runs the race over its row's columns [c * CHUNK, (c + 1) * CHUNK): its best score and the
    lowest id reaching it go to Scores / Ids[row, c], or with SINGLE (one chunk a row) the id straight to Out."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    inv_temperature = tl.load(InvTemperature + row)
    greedy = inv_temperature == 0.0
    scale = tl.where(greedy, 1.0, inv_temperature)  # a greedy row races its plain logits, noise-free
    floor = tl.load(Floors + row) if FLOORS else float("-inf")
    seed = tl.load(Seeds + row)
    draw = tl.load(Draws + row)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    for step in range(0, CHUNK, BLOCK):
        cols = c * CHUNK + step + tl.arange(0, BLOCK)
        logit = tl.load(Logits + row.to(tl.int64) * stride + cols, mask=cols < V, other=float("-inf"))
        scaled = logit.to(tl.float32) * scale
        score = tl.where(greedy, scaled, tl.where(scaled >= floor, scaled + _keyed_noise(seed, draw, cols),
                                                  float("-inf")))
        better = score > best  # strict: the lowest id among equal scores stays
        best = tl.where(better, score, best)
        best_id = tl.where(better, cols, best_id)
    top, top_id = _winner(best, best_id, V)
    if SINGLE:
        tl.store(Out + row, top_id.to(tl.int64))
    else:
        tl.store(Scores + row * tl.num_programs(1) + c, top)
        tl.store(Ids + row * tl.num_programs(1) + c, top_id)


@triton.jit
def _race_final_kernel(Scores, Ids, Out, V, CHUNKS, CHUNKS_P2: tl.constexpr):
    """Row r's winner over its chunks' winners: the best score, the lowest id among chunks reaching it (chunks
    hold ascending ids, each its own lowest), as one program over the whole row would pick."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_P2)
    score = tl.load(Scores + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
    ids = tl.load(Ids + row * CHUNKS + c, mask=c < CHUNKS, other=V)
    _, top_id = _winner(score, ids, V)
    tl.store(Out + row, top_id.to(tl.int64))


# Columns a program races: a 64-row batch of a 201,088-token vocabulary runs as 64 x 50 programs, one row as 50,
# where one program a row left most of the GPU idle (64 rows took 0.18 ms on an H100).
CHUNK = 4096


def exponential_race(logits: torch.Tensor, inv_temperature: torch.Tensor, floors: torch.Tensor | None,
                     seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """logits (B, V) of any float dtype; inv_temperature (B,) float32 (0: greedy), floors (B,) float32 or None (no
    filters), seeds / draws (B,) int64, all on its device -> token ids (B,) int64."""
    batch, vocab = logits.shape
    assert logits.stride(1) == 1 and seeds.shape == draws.shape == inv_temperature.shape == (batch,)
    assert inv_temperature.dtype == torch.float32 and (floors is None or floors.dtype == torch.float32)
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    if not batch:
        return out
    chunks = triton.cdiv(vocab, CHUNK)
    block = min(1024, CHUNK, triton.next_power_of_2(vocab))  # CHUNK: a power of two
    scores = torch.empty((batch, chunks), dtype=torch.float32, device=logits.device)
    ids = torch.empty((batch, chunks), dtype=torch.int32, device=logits.device)
    _race_kernel[(batch, chunks)](logits, inv_temperature, inv_temperature if floors is None else floors, seeds, draws,
                                  out, scores, ids, vocab, logits.stride(0),
                                  CHUNK=min(CHUNK, triton.cdiv(vocab, block) * block), BLOCK=block,
                                  SINGLE=chunks == 1, FLOORS=floors is not None, num_warps=4)
    if chunks > 1:
        _race_final_kernel[(batch,)](scores, ids, out, vocab, chunks, CHUNKS_P2=triton.next_power_of_2(chunks),
                                     num_warps=1)
    return out
