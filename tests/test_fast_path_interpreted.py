"""The GPU fast path's model-level wiring, run on the CPU through Triton's interpreter: a tiny float32 model with
every Triton dispatch of gptoss.model switched on (fused norms and GEMVs, RoPE kernel writing the KV cache, top-K
kernel, MoE kernels adding the residual) over TritonKVCache, against the pure path. The full-size and CUDA-graph
versions are in test_fast_path.py (GPU only)."""

import dataclasses

import pytest
import torch

from conftest import SMALL, TRITON_INTERPRET_TESTS, random_model, relative_error

pytestmark = pytest.mark.skipif(not TRITON_INTERPRET_TESTS, reason="runs where Triton's interpreter is in use")
pytest.importorskip("triton")

import gptoss.model  # noqa: E402
from gptoss.cuda_cache import TritonKVCache  # noqa: E402

TWO_LAYERS = dataclasses.replace(SMALL, num_hidden_layers=2)  # one sliding-window layer, one full layer


def test_triton_path_equals_pure_path(monkeypatch):
    """A 20-token prefill (grouped-GEMM MoE, flash attention over a ring that already wrapped) then 6 decode steps
    (GEMV MoE, split-K decode attention, k/v stored by the RoPE kernel)."""
    model = random_model(TWO_LAYERS)
    tokens = torch.randint(0, SMALL.vocab_size, (26,), generator=torch.Generator().manual_seed(0))
    prefill = 20
    assert SMALL.sliding_window < prefill
    with torch.inference_mode():
        pure = model(tokens)
        monkeypatch.setattr(gptoss.model, "use_triton", lambda *tensors: True)
        cache = TritonKVCache(TWO_LAYERS, context_length=len(tokens), dtype=torch.float32)
        rows = [model(tokens[:prefill], cache.reserve(prefill), cache)]
        rows += [model(tokens[i : i + 1], cache.reserve(1), cache) for i in range(prefill, len(tokens))]
    assert relative_error(torch.cat(rows), pure) <= 1e-5


def test_chunked_prefill_over_the_ring_equals_pure_path(monkeypatch):
    """Prefill chunks of 5, 9 and 12 tokens over a 16-slot ring (a first chunk shorter than the ring, one that
    fills it without wrapping, one that wraps it while its early queries still need the keys it replaces), then a
    decode step."""
    model = random_model(TWO_LAYERS)
    tokens = torch.randint(0, SMALL.vocab_size, (27,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pure = model(tokens)
        monkeypatch.setattr(gptoss.model, "use_triton", lambda *tensors: True)
        cache = TritonKVCache(TWO_LAYERS, context_length=len(tokens), dtype=torch.float32)
        rows, start = [], 0
        for n in (5, 9, 12, 1):
            rows.append(model(tokens[start : start + n], cache.reserve(n), cache))
            start += n
    assert relative_error(torch.cat(rows), pure) <= 1e-5


def test_paged_cache_path_equals_pure_path(monkeypatch):
    """The engine's GPU path without the CUDA graph: a packed prefill of two sequences over TritonPagedKVCache, then
    decode steps driven by DecodeStep metadata (padded to a batch bucket, k/v stored by the RoPE kernel into the
    paged pools, paged split-K decode attention), as GraphedBatchDecode records them."""
    from gptoss.cuda_cache import DecodeStep, TritonPagedKVCache

    model = random_model(TWO_LAYERS)
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, SMALL.vocab_size, (n,), generator=gen) for n in (10, 25)]
    prompt_lengths, steps, block_size = (7, 22), 3, 4
    tables = [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]
    with torch.inference_mode():
        pure = [model(s) for s in sequences]
        monkeypatch.setattr(gptoss.model, "use_triton", lambda *tensors: True)
        cache = TritonPagedKVCache(TWO_LAYERS, num_blocks=12, block_size=block_size, dtype=torch.float32)
        positions = cache.prepare([(t, 0, n) for t, n in zip(tables, prompt_lengths)])
        tokens = torch.cat([s[:n] for s, n in zip(sequences, prompt_lengths)])
        last = torch.tensor([prompt_lengths[0] - 1, sum(prompt_lengths) - 1])
        prefill = model(tokens, positions, cache, logits_rows=last)
        cache.finish()
        decode_step = DecodeStep(cache, max_batch=4, max_context=32)
        decoded = []
        for j in range(steps):
            decode_step.fill([(t, n + j, n + j + 1) for t, n in zip(tables, prompt_lengths)], batch=4)
            view = decode_step.view(4)  # two real rows, two padding rows
            fed = torch.zeros(4, dtype=torch.long)
            fed[:2] = torch.stack([s[n + j] for s, n in zip(sequences, prompt_lengths)])
            cache.decode_step = view
            decoded.append(model(fed, view.positions, cache)[:2])
            cache.decode_step = None
    for i, (p, n) in enumerate(zip(pure, prompt_lengths)):
        fast = torch.cat([prefill[i : i + 1]] + [d[i : i + 1] for d in decoded])
        assert relative_error(fast, p[n - 1 : n + steps]) <= 1e-5
