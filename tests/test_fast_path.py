"""The GPU fast path (Triton kernels, CUDA-graph decode, the engine's batched graphs) against the pure-PyTorch
path on gpt-oss-20b shapes with random weights. Skipped without CUDA.

Both paths run in bf16 and differ only in rounding (each kernel's output differs from its pure op in at most 0.4%
of elements: scripts/rounding_audit.py). Over 24 random layers any difference grows to a few percent of the logits:
one-ulp changes to 0.01% of the first layer's inputs move the pure path's own logits by 3e-2, as far as pure bf16
lies from pure float32 (scripts/rounding_audit.py --sensitivity). So each check judges the fast path against the
float32 pure path and requires it to be no noisier than the pure path in bf16.
"""

import asyncio

import pytest
import torch

from conftest import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from gptoss.bench import decisive_routers, random_model  # noqa: E402
from gptoss.engine import Engine, SamplingParams  # noqa: E402
from gptoss.generate import TokenGenerator  # noqa: E402


@pytest.fixture(scope="module")
def model_20b():
    return decisive_routers(random_model("gpt-oss-20b", "cuda"))


@pytest.fixture(scope="module")
def model_20b_float32():
    return decisive_routers(random_model("gpt-oss-20b", "cuda", dtype=torch.float32))


@torch.inference_mode()
def fast_logits(model, tokens, prefill):
    """Prefill `prefill` tokens in one forward, then teacher-force the rest one CUDA-graph step at a time."""
    generator = TokenGenerator(None, "cuda", context_length=len(tokens) + 1, model=model)
    assert generator.graphed_decode is not None
    rows = [model(tokens[:prefill], generator.cache.reserve(prefill), generator.cache)]
    rows += [generator._decode(token)[None].clone() for token in tokens[prefill:]]
    return torch.cat(rows).float()


def check_against_pure(model, model_float32, tokens, prefill, monkeypatch):
    fast = fast_logits(model, tokens, prefill)
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")
    with torch.inference_mode():
        pure = model(tokens).float()
        exact = model_float32(tokens).float()
    top1 = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()  # noqa: E731
    stats = {"fast_vs_pure": relative_error(fast, pure), "top1_fast_vs_pure": top1(fast, pure),
             "fast_vs_float32": relative_error(fast, exact), "pure_vs_float32": relative_error(pure, exact),
             "top1_fast_vs_float32": top1(fast, exact), "top1_pure_vs_float32": top1(pure, exact)}
    print(f"\n{len(tokens)} positions, prefill {prefill}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    assert stats["fast_vs_float32"] <= 1.25 * stats["pure_vs_float32"] + 2e-3
    # where the fast path's top token differs, it is a near-tie in float32 (logits have std ~1 here)
    assert max_logit_deficit(exact, fast.argmax(-1)) <= 0.5
    return stats


def max_logit_deficit(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """How far below each row's maximum the chosen tokens' logits lie, at most."""
    chosen = logits.gather(1, tokens[:, None])[:, 0]
    return float((logits.max(-1).values - chosen).max())


def test_20b_fast_path_against_pure_path_over_512_positions(model_20b, model_20b_float32, monkeypatch):
    tokens = torch.randint(0, 199998, (512,), generator=torch.Generator().manual_seed(0)).cuda()
    check_against_pure(model_20b, model_20b_float32, tokens, 200, monkeypatch)


def test_20b_fast_path_in_float32_equals_pure_path_over_512_positions(model_20b_float32, monkeypatch):
    """The same comparison without bf16 rounding noise: with float32 activations (and exact float32 dots) the fast
    path's kernels, cache and CUDA graph compute the pure path's function, so the two agree far inside the issue's
    bounds (relative error <= 1e-2, top-1 agreement >= 99%)."""
    tokens = torch.randint(0, 199998, (512,), generator=torch.Generator().manual_seed(0)).cuda()
    fast = fast_logits(model_20b_float32, tokens, 200)
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")
    with torch.inference_mode():
        pure = model_20b_float32(tokens).float()
    error = relative_error(fast, pure)
    top1 = (fast.argmax(-1) == pure.argmax(-1)).float().mean().item()
    print(f"\nfloat32, 512 positions, prefill 200: fast_vs_pure {error:.2e}, top1_fast_vs_pure {top1:.4f}")
    assert error <= 1e-3 and top1 >= 0.99


@pytest.mark.parametrize("prefill", [1, 3, 127, 128, 129])
def test_prefill_then_decode_across_window_boundaries(model_20b, model_20b_float32, monkeypatch, prefill):
    tokens = torch.randint(0, 199998, (prefill + 140,), generator=torch.Generator().manual_seed(prefill)).cuda()
    check_against_pure(model_20b, model_20b_float32, tokens, prefill, monkeypatch)


def test_engine_on_gpu_picks_near_argmax_tokens(model_20b, model_20b_float32, monkeypatch):
    """The engine's GPU path (Triton paged attention, per-batch-size CUDA graphs, batched MoE), after its warm-up:
    16 concurrent greedy requests complete, and every token picked is a near-argmax of the float32 pure path given the same prefix.

    (Token-for-token equality with each request alone does not hold on GPU: bf16 results depend on the batch size
    as cuBLAS picks kernels by shape, and random weights give flat logits whose top two often lie closer than that
    noise. A wrong kernel picks tokens far below the argmax.)"""
    engine = Engine(model_20b, max_batch_size=16, context_length=512)
    assert engine.decode_steps is not None
    engine.warm_up()  # every decode bucket captured, the scratch blocks given back
    assert sorted(engine.decode_steps.graphs) == engine.decode_steps.buckets
    assert engine.blocks.num_free == engine.num_blocks
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=())
    prompts = [torch.randint(0, 199998, (20 + 13 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(16)]

    async def run(prompt):
        return [out.token async for out in engine.generate(prompt, params)]

    async def together():
        return await asyncio.gather(*(run(p) for p in prompts))

    try:
        outputs = asyncio.run(together())
    finally:
        engine.stop()
    assert all(len(tokens) == 24 for tokens in outputs)
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")
    deficits = []
    with torch.inference_mode():
        for prompt, generated in zip(prompts, outputs):
            sequence = torch.tensor(prompt + generated[:-1], device="cuda")
            logits = model_20b_float32(sequence)[len(prompt) - 1 :].float()  # rows predicting each generated token
            deficits.append(max_logit_deficit(logits, torch.tensor(generated, device="cuda")))
    print(f"\nengine tokens: largest logit deficit against the float32 argmax {max(deficits):.3f}")
    assert max(deficits) <= 0.5
