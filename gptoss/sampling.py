"""Token sampling on the device, without a host sync: temperature, top-k, top-p, and keyed randomness.

A row's randomness is a function of (seed, draw): the request's seed and how many tokens it drew before. So a
request samples the same tokens alone or in any batch (and after a preemption), and a batch of rows with different
seeds is one call. The sampler is the exponential race (Gumbel-max): with E_i ~ Exp(1) independent,
argmax_i (logit_i / T - log E_i) = argmax_i p_i / E_i is token i with probability p_i = softmax(logits / T)_i, so no
softmax is computed. On CUDA one Triton kernel reads the logits once and draws E from Philox keyed by
(seed, draw, token id) (gptoss.kernels.sample_triton); the reference draws each row's E from a torch generator
seeded from (seed, draw). The two are different streams (as torch's CPU and CUDA generators are) of one distribution.
"""

import torch

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


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: torch.Tensor | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.
    seeds, draws (B,) int64 on the logits' device: each row's seed and draw index (None: fresh random seeds,
    draw 0)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if seeds is None:
        seeds = random_seeds(logits.shape[0], logits.device)
    if draws is None:
        draws = torch.zeros_like(seeds)
    inv_temperature = 1.0 / temperature
    if top_k > 0 or top_p < 1.0:
        logits = logits.float() * inv_temperature
        inv_temperature = 1.0
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if use_triton(logits):
        from gptoss.kernels.sample_triton import exponential_race

        return exponential_race(logits.contiguous(), inv_temperature, seeds, draws)
    return exponential_race_reference(logits, inv_temperature, seeds, draws)


def exponential_race_reference(logits: torch.Tensor, inv_temperature: float, seeds: torch.Tensor,
                               draws: torch.Tensor) -> torch.Tensor:
    """argmax_i (logits[r, i] * inv_temperature - log E_i), E ~ Exp(1) from a generator seeded by (seed, draw).
    Reads the seeds on the host (a sync on GPUs; the CUDA path is the Triton kernel)."""
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for row, seed, draw in zip(noise, seeds.tolist(), draws.tolist(), strict=True):
        row.exponential_(1, generator=torch.Generator(logits.device).manual_seed(_mix(seed, draw)))
    return (logits.float() * inv_temperature - noise.clamp_min(1e-12).log()).argmax(dim=-1)


def _mix(seed: int, draw: int) -> int:
    """(seed, draw) -> a 64-bit generator seed: splitmix64's finalizer over the seed's 64 bits and the draw, so
    distinct keys give unrelated streams."""
    x = ((seed & _MASK64) ^ (draw * 0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
