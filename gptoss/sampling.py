"""Token sampling on the device, without a host sync: temperature, top-k, top-p, and keyed randomness.

A row's randomness is a function of (seed, draw): the request's seed and how many tokens it drew before. So a
request samples the same tokens alone or in any batch (and after a preemption), and a batch of rows with different
seeds is one call. The sampler is the exponential race (Gumbel-max): with E_i ~ Exp(1) independent,
argmax_i (logit_i / T - log E_i) = argmax_i p_i / E_i is token i with probability p_i = softmax(logits / T)_i, so no
softmax is computed. On CUDA one Triton kernel reads the logits once and draws E from Philox keyed by
(seed, draw, token id) (gptoss.kernels.sample_triton); the reference draws each row's E from a torch generator
seeded from (seed, draw). The two are different streams (as torch's CPU and CUDA generators are) of one distribution.
A step's rows race in one call, each with its own temperature (greedy rows take the plain argmax) and its own
floor: top-k and top-p become the smallest scaled logit (logit / T) the row keeps, so a token tied with the last
kept one stays too.
"""

from collections.abc import Sequence

import torch

from gptoss.errors import GptOssError
from gptoss.host_copy import to_device
from gptoss.kernels import use_triton

_MASK64 = 2**64 - 1


def seed_key(seed: int) -> int:
    """Any int seed -> the int64 holding its residue mod 2^64 (two's complement): every 64-bit seed a client may send
    keeps its own stream, and the key fits a device tensor."""
    seed &= _MASK64
    return seed - 2**64 if seed >= 2**63 else seed


def random_seeds(count: int, device) -> torch.Tensor:
    """Seeds for unseeded rows, from torch's default generator (torch.manual_seed makes them reproducible)."""
    return torch.randint(2**62, (count,), device=device)


def request_seed(seed: int | None) -> int:
    """A request's seed key: seed_key(seed), or a random one for an unseeded request."""
    return int(random_seeds(1, "cpu")) if seed is None else seed_key(int(seed))


def check_settings(temperature: float, top_k: int, top_p: float) -> None:
    """Raises GptOssError for a request's sampling settings that sample() does not take (NaN among them)."""
    if not temperature >= 0:
        raise GptOssError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GptOssError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise GptOssError(f"top_k must be >= 0, got {top_k}")


def sample(
    logits: torch.Tensor,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seeds: torch.Tensor | Sequence[int] | None = None,
    draws: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature, top_k, top_p: one setting for every row, or a sequence of B
    (a batch of requests with their own settings is one race). temperature 0 is greedy; top_k 0 and top_p 1.0
    disable those filters. seeds, draws (B,): each row's seed and draw index, as int64 tensors on the logits'
    device, or as host ints (both then), copied to the device only if a row samples (None: fresh random seeds,
    draw 0)."""
    batch = logits.shape[0]
    temperature, top_k, top_p = (_per_row(v, batch) for v in (temperature, top_k, top_p))
    if all(t <= 0 for t in temperature):
        return logits.argmax(dim=-1)
    if seeds is not None and not isinstance(seeds, torch.Tensor):  # host keys, in one copy
        seeds, draws = to_device([list(seeds), list(draws)], logits.device)
    if seeds is None:
        seeds = random_seeds(batch, logits.device)
    if draws is None:
        draws = torch.zeros_like(seeds)
    # 0 marks a greedy row; float32, as the race multiplies by it, so the filters' floors compare alike
    inv_temperature = to_device([1.0 / t if t > 0 else 0.0 for t in temperature], logits.device, torch.float32)
    floors = _filter_floors(logits, inv_temperature, temperature, top_k, top_p)
    if use_triton(logits):
        from gptoss.kernels.sample_triton import exponential_race

        return exponential_race(logits.contiguous(), inv_temperature, floors, seeds, draws)
    return exponential_race_reference(logits, inv_temperature, floors, seeds, draws)


def _per_row(value, batch: int) -> list:
    if isinstance(value, (int, float)):
        return [value] * batch
    if len(value) != batch:
        raise ValueError(f"{len(value)} sampling settings for {batch} rows of logits")
    return list(value)


def _filter_floors(logits: torch.Tensor, inv_temperature: torch.Tensor, temperature: list, top_k: list,
                   top_p: list) -> torch.Tensor | None:
    """(B,) float32: the smallest scaled logit (logit * inv_temperature) a row keeps under its top-k / top-p
    filters, -inf for rows without them; None when no row has one. Rows with equal filters are one torch call."""
    groups = {}
    for row, (t, k, p) in enumerate(zip(temperature, top_k, top_p)):
        if t > 0 and (k > 0 or p < 1.0):
            groups.setdefault((k, p), []).append(row)
    if not groups:
        return None
    batch, vocab = logits.shape
    floors = torch.full((batch,), float("-inf"), dtype=torch.float32, device=logits.device)
    for (k, p), rows in groups.items():
        idx = slice(None) if len(rows) == batch else to_device(rows, logits.device)
        scaled = logits[idx].float() * inv_temperature[idx, None]
        if k > 0:  # the k best, descending
            ranked = torch.topk(scaled, min(k, vocab), dim=-1).values
        else:
            ranked = torch.sort(scaled, dim=-1, descending=True).values
        if p < 1.0:  # over the ranked tokens' renormalized distribution: drop a token when those ranked above
            probs = ranked.softmax(dim=-1)  # it already reach top_p (a prefix stays, the top token always)
            kept = ((probs.cumsum(dim=-1) - probs) < p).sum(dim=-1, keepdim=True)
            floors[idx] = ranked.gather(-1, kept - 1)[:, 0]
        else:
            floors[idx] = ranked[:, -1]
    return floors


def exponential_race_reference(logits: torch.Tensor, inv_temperature: torch.Tensor, floors: torch.Tensor | None,
                               seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Row r: argmax_i (logits[r, i] * inv_temperature[r] - log E_i) over the i whose scaled logit reaches
    floors[r] (None: every i), E ~ Exp(1) from a generator seeded by (seed, draw); argmax_i logits[r, i] where
    inv_temperature[r] is 0. Reads the seeds on the host (a sync on GPUs; the CUDA path is the Triton kernel)."""
    greedy = inv_temperature[:, None] == 0
    scaled = logits.float() * torch.where(greedy, 1.0, inv_temperature[:, None])  # greedy rows: plain logits
    noise = torch.ones(logits.shape, dtype=torch.float32, device=logits.device)
    for row, inv_t, seed, draw in zip(noise, inv_temperature.tolist(), seeds.tolist(), draws.tolist(), strict=True):
        if inv_t > 0:
            row.exponential_(1, generator=torch.Generator(logits.device).manual_seed(_mix(seed, draw)))
    score = scaled - noise.clamp_min(1e-12).log()
    if floors is not None:
        score = score.masked_fill(scaled < floors[:, None], float("-inf"))
    return torch.where(greedy, scaled, score).argmax(dim=-1)


def _mix(seed: int, draw: int) -> int:
    """(seed, draw) -> a 64-bit generator seed: splitmix64's finalizer over the seed's 64 bits and the draw, so
    distinct keys give unrelated streams."""
    x = ((seed & _MASK64) ^ (draw * 0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
