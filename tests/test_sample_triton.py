"""The Triton exponential race (gptoss.kernels.sample_triton): the distribution it samples, greedy in the limit,
keyed draws independent of the batch. Runs on a CUDA GPU, or through Triton's interpreter on the CPU (small
vocabularies; see conftest)."""

import pytest
import torch

from conftest import TRITON_INTERPRET_TESTS as INTERPRET
from conftest import require_triton_device

triton = require_triton_device()

import triton.language as tl  # noqa: E402

from gptoss.kernels.sample_triton import _keyed_noise, exponential_race  # noqa: E402
from gptoss.sampling import exponential_race_reference  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
ROWS = 4000 if INTERPRET else 20000


def _rows(value: float, n: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32, device=DEVICE)


@triton.jit
def _noise_kernel(Seeds, Draws, Out, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    noise = _keyed_noise(tl.load(Seeds + row), tl.load(Draws + row), cols)
    tl.store(Out + row * V + cols, noise, mask=cols < V)


def keyed_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) float32: the race kernel's -log E for each row's (seed, draw) and each token id."""
    out = torch.empty(len(seeds), vocab, device=DEVICE)
    _noise_kernel[(len(seeds),)](seeds, draws, out, vocab, BLOCK=triton.next_power_of_2(vocab))
    return out


def test_the_race_is_the_argmax_over_keyed_noise(monkeypatch):
    """Each row's token is argmax (scaled logit - log E) over the tokens reaching its floor, with E the keyed noise
    (rows split into several chunks, mixed temperatures and floors, bf16 logits)."""
    import gptoss.kernels.sample_triton as sample_triton

    monkeypatch.setattr(sample_triton, "CHUNK", 64)
    torch.manual_seed(3)
    rows, vocab = 12, 300
    logits = torch.randn(rows, vocab, device=DEVICE).bfloat16()
    inv_temperature = torch.tensor([1.0, 0.5, 2.0, 1.3] * 3, device=DEVICE)
    scaled = logits.float() * inv_temperature[:, None]
    floors = torch.where(torch.arange(rows, device=DEVICE) % 2 == 0, scaled.quantile(0.8, dim=1), float("-inf"))
    seeds = torch.tensor([5, 5, 6, 2**62 + 1] * 3, device=DEVICE)
    draws = torch.arange(rows, device=DEVICE) // 4
    expected = (scaled + keyed_noise(seeds, draws, vocab)).masked_fill(scaled < floors[:, None], float("-inf"))
    assert torch.equal(exponential_race(logits, inv_temperature, floors, seeds, draws), expected.argmax(-1))


def test_keyed_noise_is_exponential():
    """The race's noise, 64 keys (seeds and draws) x 1,024 token ids: E = exp(-noise) follows Exp(1) (Kolmogorov-
    Smirnov distance within its 0.1% bound, the small-E tail that decides races too), and neither neighbouring
    seeds, nor draws of one seed, nor neighbouring token ids are correlated."""
    seeds = torch.cat([torch.arange(32), torch.full((32,), 2**62 + 7)]).to(DEVICE)
    draws = torch.cat([torch.zeros(32, dtype=torch.long), torch.arange(32)]).to(DEVICE)
    e = keyed_noise(seeds, draws, 1024).neg().exp().double().cpu()  # (64, 1024)
    n = e.numel()
    ordered = e.flatten().sort().values
    cdf = 1 - torch.exp(-ordered)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(steps - cdf, cdf - (steps - 1 / n)).max().item()
    assert ks <= 1.95 / n**0.5, ks
    tail = (e < 1e-3).double().mean().item()  # P(E < 1e-3) = 1e-3 (within 4 standard deviations)
    assert abs(tail - 1e-3) <= 4 * (1e-3 / n) ** 0.5, tail
    bound = 4 / 1024**0.5
    for a, b in ((e[:31], e[1:32]), (e[32:63], e[33:]), (e[:, :-1], e[:, 1:])):  # seeds, draws, token ids
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) <= bound / (a.shape[0] ** 0.5), corr


def test_frequencies_follow_the_softmax():
    """ROWS independent draws (seeds 0..ROWS-1) of one row of logits in one call, the first half unfiltered, the
    second with a floor between the third and fourth scaled logits: each half's frequencies within 4 standard
    deviations (of a frequency of 1/2) of softmax(logits / T), for the second half renormalized over the first
    three tokens; for the reference, and on a GPU for the kernel (through the interpreter, which takes tens of ms a
    row, the two tests above show that the kernel races Exp(1) noise)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.05])
    vocab = 6 if INTERPRET else 5000  # the large row spans several of the kernel's blocks; padding has p = 0
    logits = torch.full((vocab,), float("-inf"))
    ids = torch.tensor([0, 1, 2, 2047, 2048, vocab - 1]) if not INTERPRET else torch.arange(6)
    logits[ids] = probs.log() * 2.0  # sampled at temperature 2: softmax(log p) = p
    rows = logits.to(DEVICE).bfloat16()[None].expand(ROWS, -1)
    seeds = torch.arange(ROWS, device=DEVICE)
    draws = torch.zeros_like(seeds)
    half = ROWS // 2
    floors = _rows(float("-inf"), ROWS)
    floors[half:] = float(probs[2:4].log().mean())  # scaled logits: log p
    filtered = torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)])
    tolerance = 4 * (0.25 / half) ** 0.5
    for race in (exponential_race_reference,) if INTERPRET else (exponential_race, exponential_race_reference):
        tokens = race(rows.contiguous(), _rows(0.5, ROWS), floors, seeds, draws).cpu()
        assert set(tokens.tolist()) <= set(ids.tolist())
        for part, expected in ((tokens[:half], probs), (tokens[half:], filtered)):
            freq = torch.stack([(part == i).float().mean() for i in ids])
            assert (freq - expected).abs().max() <= tolerance, (race.__name__, freq)


@pytest.mark.parametrize("chunk", [4096, 8])
def test_rows_split_into_chunks_pick_the_row_winner(chunk, monkeypatch):
    """A row raced in chunks (programs of CHUNK columns, then a pass over their winners) picks what one race over
    the whole row picks: the only finite logit wherever it sits, and of two logits so large that the noise cannot
    tell them apart (1e30 - log E rounds to 1e30), the lower id, across chunk boundaries too."""
    import gptoss.kernels.sample_triton as sample_triton

    monkeypatch.setattr(sample_triton, "CHUNK", chunk)
    vocab = 3 * chunk + 5
    logits = torch.full((4, vocab), float("-inf"), device=DEVICE)
    winners = [vocab - 1, chunk + 7, 2, chunk]
    logits[0, vocab - 1] = 0.0
    logits[1, [chunk + 7, 2 * chunk + 1]] = 1e30
    logits[2, [2, 3]] = 1e30
    logits[3, [2 * chunk, chunk, 3 * chunk]] = 1e30
    seeds = torch.arange(4, device=DEVICE)
    assert exponential_race(logits, _rows(1.0, 4), None, seeds, seeds).tolist() == winners


def test_low_temperature_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, 3000 if not INTERPRET else 300, device=DEVICE)
    seeds = torch.arange(8, device=DEVICE)
    tokens = exponential_race(logits, _rows(1e4, 8), None, seeds, torch.zeros_like(seeds))  # T = 1e-4: the noise
    assert torch.equal(tokens, logits.argmax(-1))  # cannot matter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keyed_rows_are_independent_of_the_batch(dtype):
    torch.manual_seed(1)
    vocab = 3000 if not INTERPRET else 200
    logits = torch.randn(5, vocab, device=DEVICE).to(dtype)
    seeds = torch.tensor([7, 2**61 + 3, 7, 0, 123456789], device=DEVICE)
    draws = torch.tensor([0, 5, 1, 2**20, 3], device=DEVICE)
    ones = _rows(1.0, 5)
    batched = exponential_race(logits, ones, None, seeds, draws)
    alone = torch.cat([exponential_race(logits[i : i + 1], ones[i : i + 1], None, seeds[i : i + 1], draws[i : i + 1])
                       for i in range(5)])
    assert torch.equal(batched, alone)
    assert torch.equal(exponential_race(logits, ones, None, seeds, draws), batched)  # keyed: same keys, same draw
    flat = torch.zeros(1, vocab, device=DEVICE)  # uniform: draw after draw of one seed wanders over the vocabulary
    picks = {exponential_race(flat, ones[:1], None, seeds[:1], torch.tensor([d], device=DEVICE)).item()
             for d in range(30)}
    assert len(picks) > 20


@pytest.mark.parametrize("race", [exponential_race, exponential_race_reference])
def test_each_row_races_with_its_own_settings(race):
    """One call over rows of different temperatures and floors draws what each row draws alone; a row at
    inverse temperature 0 is its argmax (here not the token the noise would favour), and every other row's token
    reaches its floor."""
    torch.manual_seed(2)
    vocab = 3000 if not INTERPRET else 300
    logits = torch.randn(6, vocab, device=DEVICE).bfloat16()
    inv_temperature = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0], device=DEVICE)
    scaled = logits.float() * inv_temperature[:, None]
    floors = torch.stack([torch.tensor(float("-inf"), device=DEVICE), scaled[1].max() + 1.0,  # ignored: greedy
                          scaled[2].quantile(0.99), scaled[3].quantile(0.9), torch.tensor(0.0, device=DEVICE),
                          scaled[5].max()])
    seeds = torch.arange(6, device=DEVICE) + 40
    draws = torch.arange(6, device=DEVICE)
    batched = race(logits, inv_temperature, floors, seeds, draws)
    alone = torch.cat([race(logits[i : i + 1], inv_temperature[i : i + 1], floors[i : i + 1], seeds[i : i + 1],
                            draws[i : i + 1]) for i in range(6)])
    assert torch.equal(batched, alone)
    greedy = logits.float().argmax(-1)
    assert batched[[1, 4]].tolist() == greedy[[1, 4]].tolist()
    assert batched[5] == greedy[5]  # the floor keeps only the best
    picked = scaled.gather(1, batched[:, None])[:, 0]
    assert bool((picked[[0, 2, 3, 5]] >= floors[[0, 2, 3, 5]]).all())
    assert batched[0] != greedy[0] or batched[2] != greedy[2] or batched[3] != greedy[3]  # the others drew
