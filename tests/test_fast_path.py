"""The GPU fast path (Triton kernels, CUDA-graph decode) against the pure-PyTorch path. Skipped without CUDA."""

import pytest
import torch

from conftest import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from gptoss.bench import random_model  # noqa: E402
from gptoss.generate import TokenGenerator  # noqa: E402


@pytest.fixture(scope="module")
def model_20b():
    """20b shapes with routers that have clear margins.

    With plain random routers a one-ulp bf16 difference upstream often swaps a token's 4th and 5th expert, and a
    random 24-layer network amplifies each swap: even the pure path in bf16 against itself in float32 then differs
    by ~30% at the logits. Real routers are decisive; here each layer's bias favours 4 experts (a different 4 per
    layer) over token-dependent logits 20x smaller, so the comparison measures the kernels, not the chaos.
    The MoE kernel tests cover diverse routing on their own."""
    model = random_model("gpt-oss-20b", "cuda")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.block:
            favoured = torch.randperm(model.config.num_experts, generator=gen)[: model.config.experts_per_token]
            bias = torch.zeros(model.config.num_experts)
            bias[favoured] = 2.0
            block.mlp.gate.bias.copy_(bias)
            block.mlp.gate.weight.mul_(0.05)
    return model


@torch.inference_mode()
def fast_logits(model, tokens, prefill):
    """Prefill `prefill` tokens in one forward, then teacher-force the rest one CUDA-graph step at a time."""
    generator = TokenGenerator(None, "cuda", context_length=len(tokens) + 1, model=model)
    assert generator.graphed_decode is not None
    rows = [model(tokens[:prefill], generator.cache.reserve(prefill), generator.cache)]
    rows += [generator._decode(token)[None].clone() for token in tokens[prefill:]]
    return torch.cat(rows).float()


def test_20b_fast_path_matches_pure_path_over_512_positions(model_20b, monkeypatch):
    tokens = torch.randint(0, 199998, (512,), generator=torch.Generator().manual_seed(0)).cuda()
    fast = fast_logits(model_20b, tokens, prefill=200)
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")
    with torch.inference_mode():
        reference = model_20b(tokens).float()
    error = relative_error(fast, reference)
    agreement = (fast.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"20b fast vs pure over 512 positions: relative error {error:.2e}, top-1 agreement {agreement:.2%}")
    assert error <= 1e-2
    assert agreement >= 0.99


@pytest.mark.parametrize("prefill", [1, 3, 127, 128, 129])
def test_prefill_then_decode_across_window_boundaries(model_20b, monkeypatch, prefill):
    tokens = torch.randint(0, 199998, (prefill + 140,), generator=torch.Generator().manual_seed(prefill)).cuda()
    fast = fast_logits(model_20b, tokens, prefill=prefill)
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")
    with torch.inference_mode():
        reference = model_20b(tokens).float()
    assert relative_error(fast, reference) <= 1e-2


def test_engine_on_gpu_batches_like_requests_alone(model_20b):
    """The engine's GPU path (Triton paged attention, per-batch-size CUDA graphs): 16 concurrent greedy requests
    give the tokens each gives alone."""
    import asyncio

    from gptoss.engine import Engine, SamplingParams

    engine = Engine(model_20b, max_batch_size=16, context_length=512)
    assert engine.graphed_decode is not None
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=())
    prompts = [torch.randint(0, 199998, (20 + 13 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(16)]

    async def run(prompt):
        return [out.token async for out in engine.generate(prompt, params)]

    async def together():
        return await asyncio.gather(*(run(p) for p in prompts))

    try:
        batched = asyncio.run(together())
        alone = [asyncio.run(run(p)) for p in prompts]
    finally:
        engine.stop()
    assert all(len(tokens) == 24 for tokens in batched)
    assert batched == alone
