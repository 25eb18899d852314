"""The continuous-batching engine (gptoss/engine.py) over the paged KV cache (gptoss/paged_cache.py), on CPU.

A tiny random model (float32, vocab 1024, sliding window 16 so prompts cross it) is the reference: every batched,
preempted or prefix-reusing run must reproduce what TokenGenerator gives for the request alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from gptoss.checkpoint_writer import fill_random
from gptoss.config import preset
from gptoss.engine import Engine, EngineError, SamplingParams, TokenOutput
from gptoss.errors import ContextLengthError, GptOssError
from gptoss.generate import TokenGenerator
from gptoss.model import Transformer
from gptoss.paged_cache import BlockManager, block_hash

WINDOW = 16


@pytest.fixture(scope="module")
def model():
    config = dataclasses.replace(preset("tiny"), vocab_size=1024, sliding_window=WINDOW)
    m = Transformer(config, dtype=torch.float32)
    fill_random(m, seed=0)
    return m.eval()


@pytest.fixture(scope="module")
def reference(model):
    """Greedy (or seeded) output of one request run alone through TokenGenerator."""
    gen = TokenGenerator(None, "cpu", model=model, context_length=512)
    memo = {}

    def run(prompt, max_tokens, stop=(), temperature=0.0, **kw):
        key = (tuple(prompt), max_tokens, tuple(stop), temperature, tuple(sorted(kw.items())))
        if key not in memo:
            memo[key] = list(gen.generate(prompt, stop, temperature=temperature, max_tokens=max_tokens, **kw))
        return memo[key]

    return run


def make_prompts(n, seed, min_len=1, max_len=60):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 1000, (k,), generator=g).tolist() for k in lengths]


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=(), **kw)


async def collect(engine, prompt, params) -> list[TokenOutput]:
    return [out async for out in engine.generate(prompt, params)]


def run_all(engine, jobs):
    """jobs: [(prompt, params)] run concurrently -> [[TokenOutput]]."""

    async def main():
        return await asyncio.gather(*(collect(engine, p, sp) for p, sp in jobs))

    return asyncio.run(main())


def wait_idle(engine, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == s["total_blocks"]:
            return s
        time.sleep(0.01)
    raise AssertionError(f"engine did not become idle: {engine.stats()}")


@pytest.fixture(params=[False, True], ids=["in_turn", "launch_ahead"])
def engine_factory(model, request):
    """Engines in both step modes: each step scheduled after the previous one's tokens are delivered, and steps
    launched ahead of that (the GPU default, run here on the CPU to check its bookkeeping)."""
    engines = []

    def make(**kw):
        kw.setdefault("context_length", 512)
        kw.setdefault("block_size", 4)
        kw.setdefault("launch_ahead", request.param)
        e = Engine(model, **kw)
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


def test_concurrent_greedy_matches_single_requests(engine_factory, reference):
    prompts = make_prompts(32, seed=1)
    assert any(len(p) > 2 * WINDOW for p in prompts) and any(len(p) < 4 for p in prompts)
    max_tokens = [8 + (i * 7) % 17 for i in range(32)]  # 8..24: requests leave the batch at different steps
    engine = engine_factory(max_batch_size=64, num_blocks=1024)
    outs = run_all(engine, [(p, greedy(m)) for p, m in zip(prompts, max_tokens)])
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert [o.token for o in out] == reference(prompt, m)
        assert [o.finish_reason for o in out] == [None] * (m - 1) + ["length"]
    s = wait_idle(engine)
    assert s["preemptions"] == 0


def test_warm_up_is_a_no_op_on_cpu(engine_factory):
    engine = engine_factory(max_batch_size=4)
    engine.warm_up()
    s = engine.stats()
    assert s["prefill_steps"] == s["decode_steps"] == 0 and s["free_blocks"] == s["total_blocks"]


def test_step_stats_count_prefill_and_decode_steps(engine_factory):
    """Every fed token is counted once: each request's prompt in prefill steps, each generated token but the
    last in a decode step (one token per sequence)."""
    prompts = make_prompts(3, seed=11, min_len=5, max_len=12)
    engine = engine_factory(max_batch_size=8)
    run_all(engine, [(p, greedy(6)) for p in prompts])
    s = wait_idle(engine)
    assert s["prefill_steps"] >= 1 and s["prefill_tokens"] == sum(len(p) for p in prompts)
    assert s["decode_steps"] >= 5 and s["decode_tokens"] == 3 * 5
    assert s["prefill_seconds"] > 0 and s["decode_seconds"] > 0
    assert s["prefill_device_seconds"] == s["decode_device_seconds"] == 0.0  # CPU: no device timing


def a_then_b(engine, a_prompt, a_max, b_prompt, b_max):
    """Greedy request A, and B submitted once A has 3 tokens -> (A's tokens, B's tokens, the order in which the
    engine delivered their tokens: a list of "A" and "B")."""
    order = []

    async def run(name, prompt, max_tokens, a_running, wait):
        if wait:
            await a_running.wait()
        tokens = []
        async for out in engine.generate(prompt, greedy(max_tokens)):
            order.append(name)
            tokens.append(out.token)
            if name == "A" and len(tokens) == 3:
                a_running.set()
        return tokens

    async def main():
        a_running = asyncio.Event()  # B arrives once A is decoding
        return await asyncio.gather(run("A", a_prompt, a_max, a_running, False),
                                    run("B", b_prompt, b_max, a_running, True))

    a_tokens, b_tokens = asyncio.run(main())
    return a_tokens, b_tokens, order


def test_a_one_token_prompt_does_not_starve_running_requests(engine_factory, reference):
    """A request admitted with a single token to compute makes a step that looks like a decode step; it must not
    run on alone (decode ahead chains only steps that cover every running request): the running request keeps
    getting tokens meanwhile, and both outputs are what each gives alone."""
    engine = engine_factory(max_batch_size=8)
    a_tokens, b_tokens, order = a_then_b(engine, list(range(10, 30)), 40, [7], 20)
    assert a_tokens == reference(list(range(10, 30)), 40) and b_tokens == reference([7], 20)
    during_b = "".join(order)[order.index("B"):len(order) - order[::-1].index("B")]
    assert during_b.count("A") >= 15  # A advances along with B (one token per step each), not after it


@pytest.mark.parametrize("length", [70, 65])  # 65: the last prompt token is left alone, to a decode step
def test_a_long_prompt_is_prefilled_in_chunks(engine_factory, reference, length):
    """A prompt longer than max_prefill_tokens is prefilled in steps of at most that many tokens (chunked prefill),
    and gives the tokens it gives alone; the chunks' full blocks enter the prefix cache."""
    prompt = make_prompts(1, seed=5, min_len=length, max_len=length)[0]
    engine = engine_factory(max_prefill_tokens=16)
    out = run_all(engine, [(prompt, greedy(6))])[0]
    assert [o.token for o in out] == reference(prompt, 6)
    s = wait_idle(engine)
    assert s["prefill_steps"] == -(-(length - 1) // 16) and s["prefill_tokens"] + s["decode_tokens"] == length + 5
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=9, stop_token_ids=())
    again = run_all(engine, [(prompt, seeded)])[0]
    assert [o.token for o in again] == reference(prompt, 6, temperature=1.0, seed=9)
    assert again[0].cached_tokens == (length - 1) // 4 * 4  # every full block but the last token's


def test_decoding_requests_advance_between_chunks(engine_factory, reference):
    """While a long prompt is prefilled in chunks, the running requests get a decode step after each chunk: a
    long prompt does not stall them for its whole prefill."""
    engine = engine_factory(max_batch_size=8, max_prefill_tokens=8)
    long_prompt = make_prompts(1, seed=6, min_len=96, max_len=96)[0]  # 12 chunks
    a_tokens, b_tokens, order = a_then_b(engine, list(range(10, 30)), 40, long_prompt, 4)
    assert a_tokens == reference(list(range(10, 30)), 40) and b_tokens == reference(long_prompt, 4)
    assert order.index("B") >= 3 + 10  # A's tokens before B's first: its 3, then one a chunk (12 chunks)


def test_cancelling_during_a_chunked_prefill_frees_blocks(engine_factory):
    engine = engine_factory(max_prefill_tokens=4)
    prompt = make_prompts(1, seed=7, min_len=400, max_len=400)[0]  # 100 chunks

    async def main():
        task = asyncio.ensure_future(collect(engine, prompt, greedy(4)))
        deadline = time.monotonic() + 30
        while engine.stats()["prefill_steps"] < 3:
            assert time.monotonic() < deadline and not task.done(), "the prompt was not prefilled in chunks"
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.stats()

    mid = asyncio.run(main())
    assert mid["decode_steps"] == 0 and mid["prefill_steps"] < 100  # cancelled part way through the prefill
    s = wait_idle(engine)
    assert s["free_blocks"] == s["total_blocks"]


def test_chunked_prefills_with_preemption_match_single_requests(engine_factory, reference):
    prompts = make_prompts(8, seed=8, min_len=20, max_len=40)
    engine = engine_factory(max_batch_size=8, num_blocks=24, max_prefill_tokens=8)
    outs = run_all(engine, [(p, greedy(16)) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert [o.token for o in out] == reference(prompt, 16)
    s = wait_idle(engine)
    assert s["preemptions"] > 0 and s["free_blocks"] == s["total_blocks"]


def test_admission_control_and_preemption_with_tiny_cache(engine_factory, reference):
    # 24 blocks of 4 = 96 tokens; 12 requests of up to 40 + 20 tokens: only a couple fit at a time
    prompts = make_prompts(12, seed=2, min_len=20, max_len=40)
    engine = engine_factory(max_batch_size=8, num_blocks=24)
    outs = run_all(engine, [(p, greedy(20)) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert [o.token for o in out] == reference(prompt, 20)
        assert out[-1].finish_reason == "length"
    s = wait_idle(engine)
    assert s["preemptions"] > 0  # the batch outgrew the cache while decoding


def test_max_batch_size_limits_running_requests(engine_factory, reference):
    prompts = make_prompts(6, seed=10, min_len=5, max_len=30)
    engine = engine_factory(max_batch_size=2, num_blocks=256)
    seen = []

    async def watch(prompt):
        out = []
        async for o in engine.generate(prompt, greedy(8)):
            seen.append(engine.stats())
            out.append(o.token)
        return out

    async def main():
        return await asyncio.gather(*(watch(p) for p in prompts))

    outs = asyncio.run(main())
    assert outs == [reference(p, 8) for p in prompts]
    assert max(s["running"] for s in seen) <= 2 and max(s["waiting"] for s in seen) > 0
    wait_idle(engine)


def test_prefix_reuse(engine_factory, reference):
    prefix = make_prompts(1, seed=3, min_len=70, max_len=70)[0]
    first, second, third = prefix + [5, 6, 7], prefix + [9, 10], prefix[:50]
    engine = engine_factory(num_blocks=256)
    out1 = run_all(engine, [(first, greedy(12))])[0]
    assert out1[0].cached_tokens == 0
    assert engine.stats()["cached_prefix_blocks"] == 0
    # later requests reuse the first one's blocks (released, still cached); the last two share them concurrently
    out2, out3 = run_all(engine, [(second, greedy(12)), (third, greedy(12))])
    s = wait_idle(engine)
    assert s["cached_prefix_blocks"] >= 70 // 4 + 49 // 4
    assert out2[0].cached_tokens == 68 and out3[0].cached_tokens == 48
    no_reuse = engine_factory(num_blocks=256, enable_prefix_caching=False)
    base = run_all(no_reuse, [(p, greedy(12)) for p in (first, second, third)])
    assert wait_idle(no_reuse)["cached_prefix_blocks"] == 0
    for prompt, out, b in zip((first, second, third), (out1, out2, out3), base):
        assert [o.token for o in out] == [o.token for o in b] == reference(prompt, 12)
    # the same prompt again reuses every full block but the one of its last token (its logits are needed)
    again, aligned = run_all(engine, [(first, greedy(12)), (prefix + [5, 6], greedy(12))])
    assert again[0].cached_tokens == 72 and aligned[0].cached_tokens == 68
    assert [o.token for o in again] == [o.token for o in out1]
    assert [o.token for o in aligned] == reference(prefix + [5, 6], 12)
    # a whole conversation (prompt + generated tokens) is reusable by the next turn
    turn2 = first + [o.token for o in out1] + [11, 12, 13]
    out4 = run_all(engine, [(turn2, greedy(6))])[0]
    assert out4[0].cached_tokens >= (len(first) + 11) // 4 * 4
    assert [o.token for o in out4] == reference(turn2, 6)


def test_prefills_in_a_row_reuse_a_shared_prefix_and_draw_as_alone(engine_factory, reference):
    """Small prefill steps, so that prefills follow each other (launched ahead on the GPU): a request whose prompt
    starts with blocks that a step in flight computes waits for them and reuses them; seeded and greedy outputs
    equal each request alone."""
    engine = engine_factory(num_blocks=256, max_prefill_tokens=70)
    prefix = make_prompts(1, seed=12, min_len=64, max_len=64)[0]
    prompts = [prefix + p for p in make_prompts(6, seed=13, min_len=3, max_len=6)]
    jobs = [(p, SamplingParams(max_tokens=5, temperature=1.2, seed=40 + i, stop_token_ids=()) if i % 2 else greedy(5))
            for i, p in enumerate(prompts)]
    outs = run_all(engine, jobs)
    wait_idle(engine)
    assert [out[0].cached_tokens for out in outs] == [0] + [64] * 5
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        kw = dict(temperature=1.2, seed=40 + i) if i % 2 else {}
        assert [o.token for o in out] == reference(prompt, 5, **kw)


def test_consumer_that_stops_frees_blocks(engine_factory, reference):
    engine = engine_factory(num_blocks=128)
    prompt = make_prompts(1, seed=4, min_len=30, max_len=30)[0]
    other = make_prompts(1, seed=5, min_len=10, max_len=10)[0]

    async def close_early():
        agen = engine.generate(prompt, greedy(200))
        got = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()
        return got

    async def break_early():
        got = []
        async for out in engine.generate(prompt, greedy(200)):
            got.append(out)
            if len(got) == 3:
                break
        return got

    async def cancel_task():
        seen = asyncio.Event()

        async def consume():
            async for _ in engine.generate(prompt, greedy(200)):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        a, b = await asyncio.gather(close_early(), collect(engine, other, greedy(10)))
        c = await break_early()
        await cancel_task()
        return a, b, c

    a, b, c = asyncio.run(main())
    want = reference(prompt, 3)
    assert [o.token for o in a] == [o.token for o in c] == want
    assert [o.token for o in b] == reference(other, 10)  # its neighbour's cancellation did not disturb it
    s = wait_idle(engine)
    assert s["free_blocks"] == s["total_blocks"]


def test_context_length_errors(engine_factory, reference):
    engine = engine_factory(context_length=64, num_blocks=12)  # the cache holds 48 tokens

    async def first(prompt, params):
        agen = engine.generate(prompt, params)
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    with pytest.raises(ContextLengthError):
        asyncio.run(first([1] * 60, greedy(5)))  # 65 > context length 64
    with pytest.raises(ContextLengthError):
        asyncio.run(first([1] * 40, greedy(10)))  # 50 fits the context but not the whole cache
    with pytest.raises(ContextLengthError):
        engine.check_request([1] * 64, greedy(1))
    with pytest.raises(GptOssError):
        asyncio.run(first([], greedy(5)))
    with pytest.raises(GptOssError):
        asyncio.run(first([1024], greedy(5)))  # outside the vocabulary
    with pytest.raises(GptOssError):
        asyncio.run(first([1, 2], greedy(5, top_logprobs=21)))
    assert wait_idle(engine)["running"] == 0
    out = run_all(engine, [([1] * 40, greedy(8))])[0]  # exactly the cache's capacity
    assert [o.token for o in out] == reference([1] * 40, 8)


def test_stop_token_and_length(engine_factory, reference):
    prompt = make_prompts(1, seed=6, min_len=20, max_len=20)[0]
    full = reference(prompt, 16)
    k = next(i for i in range(3, 16) if full[i] not in full[:i])  # first occurrence of full[k] is at k
    engine = engine_factory(num_blocks=64)
    params_stop = SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(full[k], 99999))
    stopped, limited = run_all(engine, [(prompt, params_stop), (prompt, greedy(5))])
    assert [o.token for o in stopped] == full[: k + 1]
    assert [o.finish_reason for o in stopped] == [None] * k + ["stop"]
    assert [o.token for o in limited] == full[:5]
    assert [o.finish_reason for o in limited] == [None] * 4 + ["length"]
    assert all(o.logprob is None and o.top_logprobs is None for o in stopped + limited)
    one = run_all(engine, [(prompt, greedy(1))])[0]
    assert len(one) == 1 and one[0].finish_reason == "length"
    wait_idle(engine)


def test_logprobs_match_log_softmax(engine_factory, model):
    prompt = make_prompts(1, seed=7, min_len=25, max_len=25)[0]
    engine = engine_factory(num_blocks=64)
    p_top = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(), logprobs=True, top_logprobs=5)
    p_lp = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(), logprobs=True)
    p_sampled = SamplingParams(max_tokens=6, temperature=1.5, seed=3, stop_token_ids=(), logprobs=True,
                               top_logprobs=3)
    out_top, out_lp, out_sampled = run_all(engine, [(prompt, p_top), (prompt, p_lp), (prompt, p_sampled)])
    for out, k in ((out_top, 5), (out_lp, 0), (out_sampled, 3)):
        tokens = prompt + [o.token for o in out]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor(tokens[:-1])).float(), dim=-1)[len(prompt) - 1 :]
        for i, o in enumerate(out):
            assert o.logprob == pytest.approx(logp[i, o.token].item(), abs=1e-4)
            if k == 0:
                assert o.top_logprobs is None
                continue
            assert len(o.top_logprobs) == k
            top = torch.topk(logp[i], k)
            assert [t for t, _ in o.top_logprobs] == top.indices.tolist()
            assert [v for _, v in o.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            if out is out_top:
                assert o.top_logprobs[0][0] == o.token and o.top_logprobs[0][1] == pytest.approx(o.logprob)
    wait_idle(engine)


def test_seeded_sampling_matches_single_request(engine_factory, reference):
    prompts = make_prompts(4, seed=8, min_len=5, max_len=30)
    engine = engine_factory(num_blocks=128)
    kw = dict(temperature=0.8, top_k=50, top_p=0.9)
    jobs = [(p, SamplingParams(max_tokens=10, seed=100 + i, stop_token_ids=(), **kw)) for i, p in enumerate(prompts)]
    outs = run_all(engine, jobs)
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert [o.token for o in out] == reference(p, 10, seed=100 + i, **kw)
    # unseeded requests with equal params are sampled batched; they still finish
    outs = run_all(engine, [(p, SamplingParams(max_tokens=5, stop_token_ids=(), **kw)) for p in prompts])
    assert [len(o) for o in outs] == [5] * 4
    wait_idle(engine)


def test_failing_step_fails_its_requests_and_engine_recovers(engine_factory, reference, monkeypatch):
    engine = engine_factory(num_blocks=64)
    prompts = make_prompts(2, seed=9, min_len=10, max_len=20)
    calls = {"n": 0}
    real_forward = engine._forward

    def flaky(tokens, entries):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the running batch
            raise RuntimeError("boom")
        return real_forward(tokens, entries)

    monkeypatch.setattr(engine, "_forward", flaky)

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(10)) for p in prompts), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineError) for r in results), results
    assert isinstance(results[0].__cause__, RuntimeError)
    wait_idle(engine)
    out = run_all(engine, [(prompts[0], greedy(10))])[0]
    assert [o.token for o in out] == reference(prompts[0], 10)


def test_stats_and_lifecycle(model):
    engine = Engine(model, max_batch_size=4, context_length=128, block_size=8)
    s = engine.stats()
    assert {"running", "waiting", "free_blocks", "total_blocks", "cached_prefix_blocks"} <= set(s)
    assert s["total_blocks"] == max(128 // 8, 4 * 128 // (4 * 8)) == s["free_blocks"]
    engine.start()
    engine.start()  # idempotent
    engine.stop()


def test_block_manager_prefix_cache_and_eviction():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = bm.allocate()
    h = block_hash(None, [1, 2])
    bm.register(a, h, [1, 2])
    assert bm.lookup(h, [1, 2]) == a and bm.lookup(h, [1, 3]) is None
    assert block_hash(h, [3, 4]) != block_hash(None, [3, 4])  # chained
    bm.acquire(a)
    bm.release_all([a])
    bm.release(a)
    assert bm.num_free == 3 and bm.lookup(h, [1, 2]) == a  # freed but still cached
    b, c = bm.allocate(), bm.allocate()  # unhashed free blocks go first
    assert a not in (b, c) and bm.lookup(h, [1, 2]) == a
    d = bm.allocate()  # then the cached one is evicted
    assert d == a and bm.lookup(h, [1, 2]) is None
    with pytest.raises(RuntimeError):
        bm.allocate()


@pytest.mark.parametrize("limits", [{"max_batch_size": 0}, {"max_prefill_tokens": 0}, {"block_size": -1}])
def test_engine_limits_must_be_positive(model, limits):
    name = next(iter(limits))
    with pytest.raises(GptOssError, match=f"{name} must be positive"):
        Engine(model, context_length=64, **limits)
