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
        monkeypatch.setattr(gptoss.model, "use_triton", lambda x: True)
        cache = TritonKVCache(TWO_LAYERS, context_length=len(tokens), dtype=torch.float32)
        rows = [model(tokens[:prefill], cache.reserve(prefill), cache)]
        rows += [model(tokens[i : i + 1], cache.reserve(1), cache) for i in range(prefill, len(tokens))]
    assert relative_error(torch.cat(rows), pure) <= 1e-5
