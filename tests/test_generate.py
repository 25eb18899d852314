import pytest
import torch

from conftest import SMALL, random_model
from gptoss.errors import ContextLengthError, GptOssError
from gptoss.generate import TokenGenerator
from gptoss.sampling import sample, seed_key


@pytest.fixture(scope="module")
def generator():
    return TokenGenerator(None, "cpu", context_length=128, model=random_model())


def naive_greedy(model, prompt, steps):
    """Recomputes the whole sequence for every token, as the reference generator does."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor(tokens))[-1].argmax()))
    return tokens[len(prompt):]


def test_greedy_generation_equals_naive_recompute(generator):
    prompt = list(range(5, 5 + 3 * SMALL.sliding_window))
    out = list(generator.generate(prompt, stop_tokens=(), temperature=0.0, max_tokens=20))
    assert out == naive_greedy(generator.model, prompt, 20)


def test_stop_token_is_yielded_then_generation_ends(generator):
    prompt = [1, 2, 3]
    first = next(iter(generator.generate(prompt, (), temperature=0.0, max_tokens=1)))
    assert list(generator.generate(prompt, (first,), temperature=0.0, max_tokens=10)) == [first]


def test_logprobs_are_unscaled_log_softmax(generator):
    prompt = [7, 8, 9]
    token, logprob = next(iter(generator.generate(prompt, (), temperature=0.7, max_tokens=1,
                                                  return_logprobs=True, seed=0)))
    with torch.no_grad():
        expected = torch.log_softmax(generator.model(torch.tensor(prompt))[-1].float(), -1)[token]
    assert logprob == pytest.approx(float(expected), abs=1e-5)


def test_seed_makes_sampling_reproducible(generator):
    run = lambda seed: list(generator.generate([4, 5, 6], (), temperature=1.0, max_tokens=12, seed=seed))  # noqa: E731
    assert run(123) == run(123)
    assert run(123) != run(124)


def test_prompt_longer_than_the_context_is_a_clear_error(generator):
    with pytest.raises(ContextLengthError, match="exceeds the context length of 128"):
        list(generator.generate(list(range(120)), (), max_tokens=20))


def test_running_into_the_context_end_is_a_clear_error(generator):
    with pytest.raises(ContextLengthError, match="reached the context length"):
        list(generator.generate(list(range(100)), (), temperature=0.0, max_tokens=0))


def test_bad_prompts(generator):
    with pytest.raises(GptOssError, match="empty"):
        list(generator.generate([], ()))
    with pytest.raises(GptOssError, match="0..1023"):
        list(generator.generate([5000], ()))


@pytest.mark.parametrize("settings, message", [({"temperature": -0.5}, "temperature must be >= 0"),
                                               ({"temperature": float("nan")}, "temperature must be >= 0"),
                                               ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                                               ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                                               ({"top_k": -1}, "top_k must be >= 0")])
def test_bad_sampling_settings(generator, settings, message):
    """The engine's checks: a clear error before anything is generated, not a failure inside the sampler."""
    with pytest.raises(GptOssError, match=message):
        list(generator.generate([1, 2], (), max_tokens=2, **settings))


def test_top_k_and_top_p_restrict_the_candidates():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    assert set(sample(logits, 1.0, top_k=2).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample(logits, 1.0, top_p=0.8).tolist()) == {0, 1}
    assert set(sample(logits, 0.0).tolist()) == {0}


def test_filters_keep_the_scaled_logits_above_a_floor():
    """top-k and top-p keep a row's tokens whose logit / T reaches a floor: a token tied with the last kept one
    stays; top_p applies after the temperature, and after top_k to the k best's renormalized distribution."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]]).repeat(3000, 1)  # T = 1: p = 0.52, 0.19, 0.19, 0.07, 0.03
    assert set(sample(logits, 1.0, top_p=0.6).tolist()) == {0, 1, 2}  # the tie at the cut stays
    assert set(sample(logits, 0.5, top_p=0.6).tolist()) == {0}  # T = 0.5: p = 0.77, ...
    assert set(sample(logits, 1.0, top_k=2).tolist()) == {0, 1, 2}
    assert set(sample(logits, 1.0, top_k=2, top_p=0.7).tolist()) == {0}  # over the two best: 0.73, 0.27
    assert set(sample(logits, 1.0, top_k=3, top_p=0.7).tolist()) == {0, 1, 2}  # 0.58, 0.21, 0.21
    with pytest.raises(ValueError, match="2 sampling settings for 3000 rows"):
        sample(logits, [1.0, 1.0])


def test_rows_with_their_own_settings_draw_what_each_draws_alone():
    """One call over rows of different temperatures, top_k and top_p (greedy rows among them) draws what each
    row draws in a call of its own with its settings."""
    torch.manual_seed(3)
    logits = torch.randn(5, 60)
    settings = [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.5), (1.0, 10, 0.8)]
    temperature, top_k, top_p = (list(column) for column in zip(*settings))
    seeds = torch.arange(5) + 100
    streams = []
    for draw in range(10):
        draws = torch.full((5,), draw)
        batched = sample(logits, temperature, top_k, top_p, seeds, draws)
        alone = [sample(logits[i : i + 1], *settings[i], seeds[i : i + 1], draws[i : i + 1]).item() for i in range(5)]
        assert batched.tolist() == alone
        # keys given as host ints (as the engine and TokenGenerator pass them) draw the same
        assert sample(logits, temperature, top_k, top_p, seeds.tolist(), draws.tolist()).tolist() == alone
        assert alone[1] == logits[1].argmax()
        streams.append(tuple(alone))
    assert len(set(streams)) > 5


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(20000, 1)
    counts = torch.bincount(sample(logits, 1.0, seeds=torch.arange(20000)), minlength=3)
    assert torch.allclose(counts / 20000, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)
    hot = torch.bincount(sample(logits, 0.5, seeds=torch.arange(20000)), minlength=3)  # softmax(2 log p)
    assert torch.allclose(hot / 20000, torch.tensor([25.0, 9.0, 4.0]) / 38, atol=0.02)


def test_keyed_rows_draw_what_each_row_draws_alone():
    """Each row's draw depends only on its (seed, draw index): a batch samples every row as a call on that row
    alone would (the engine's requests, whatever else runs), and the draw index moves the stream on."""
    logits = torch.randn(3, 50)
    seeds = torch.tensor([10, 11, 12])
    streams = []
    for draw in range(20):
        draws = torch.full((3,), draw)
        batched = sample(logits, 1.3, top_k=20, seeds=seeds, draws=draws)
        alone = [sample(logits[i : i + 1], 1.3, top_k=20, seeds=seeds[i : i + 1], draws=draws[i : i + 1])[0]
                 for i in range(3)]
        assert batched.tolist() == [t.item() for t in alone]
        streams.append(batched.tolist())
    assert len({tuple(row) for row in streams}) > 5


def test_every_64_bit_seed_keeps_its_own_stream(generator):
    """Clients may send any 64-bit seed (the server takes 0 <= seed < 2^64): each maps to its own int64 key, and
    TokenGenerator samples with the largest."""
    seeds = [0, 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
    keys = [seed_key(s) for s in seeds]
    assert len(set(keys)) == len(seeds) and all(-(2**63) <= k < 2**63 for k in keys)
    assert seed_key(-1) == seed_key(2**64 - 1)  # equal mod 2^64: the same seed
    logits = torch.zeros(len(seeds), 1000)
    drawn = sample(logits, 1.0, seeds=torch.tensor(keys), draws=torch.zeros(len(seeds), dtype=torch.long))
    assert len(set(drawn.tolist())) > 3  # uniform logits: unrelated streams pick different tokens
    tokens = list(generator.generate([1, 2, 3], (), temperature=1.0, max_tokens=3, seed=2**64 - 1))
    assert tokens == list(generator.generate([1, 2, 3], (), temperature=1.0, max_tokens=3, seed=2**64 - 1))


def test_a_long_prompt_is_prefilled_in_chunks(generator):
    """A prompt longer than max_prefill_tokens is fed in forwards of at most that many tokens (here 20: chunks longer
    than the model's 16-token window, then a 10-token tail), and generates what one forward's prefill generates."""
    chunked = TokenGenerator(None, "cpu", context_length=128, model=generator.model, max_prefill_tokens=20)
    sizes = []
    reserve = chunked.cache.reserve
    chunked.cache.reserve = lambda n: sizes.append(n) or reserve(n)
    prompt = list(range(3, 53))  # 50 tokens
    out = list(chunked.generate(prompt, (), temperature=0.0, max_tokens=6))
    assert sizes[:3] == [20, 20, 10] and set(sizes[3:]) == {1}
    assert out == list(generator.generate(prompt, (), temperature=0.0, max_tokens=6))
    with pytest.raises(GptOssError, match="max_prefill_tokens must be positive"):
        TokenGenerator(None, "cpu", model=generator.model, max_prefill_tokens=0)
