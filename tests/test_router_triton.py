"""The fused Triton router (gptoss.kernels.router_triton) against the reference route(nn.Linear(t)).

GPU tests need CUDA and triton (skipped in CI); GPTOSS_TRITON_INTERPRET_TESTS=1 runs them on the CPU through the
Triton interpreter with small shapes."""

import os

import pytest
import torch

INTERPRET = os.environ.get("GPTOSS_TRITON_INTERPRET_TESTS") == "1"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
triton = pytest.importorskip("triton")
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs CUDA (or GPTOSS_TRITON_INTERPRET_TESTS=1)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from gptoss.kernels.moe import route  # noqa: E402
from gptoss.kernels.router_triton import route_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.mark.parametrize("n_tokens, n_experts, hidden", [(2, 32, 2880), (3, 128, 2880), (64, 32, 2880), (5, 8, 96)])
def test_router_matches_reference(n_tokens, n_experts, hidden):
    gen = torch.Generator().manual_seed(n_tokens * 1000 + n_experts)
    t = torch.randn(n_tokens, hidden, generator=gen).to(torch.bfloat16).to(DEVICE)
    weight = (torch.randn(n_experts, hidden, generator=gen) * hidden**-0.5).to(torch.bfloat16).to(DEVICE)
    bias = (torch.randn(n_experts, generator=gen) * 0.1).to(torch.bfloat16).to(DEVICE)
    logits = F.linear(t, weight, bias)
    ref_weights, ref_ids = route(logits, 4)
    weights, ids = route_triton(t, weight, bias, 4)
    assert weights.dtype == t.dtype and ids.shape == (n_tokens, 4)
    # the accumulation order differs from the GEMM's, so only rows whose 4th and 5th logits are clearly apart
    # must pick the same experts (in any order) with the same weights
    top5 = logits.float().topk(5, dim=-1).values
    clear = torch.nonzero(top5[:, 3] - top5[:, 4] > 0.02)[:, 0].tolist()
    assert clear
    for row in clear:
        mine = dict(zip(ids[row].tolist(), weights[row].float().tolist()))
        expected = dict(zip(ref_ids[row].tolist(), ref_weights[row].float().tolist()))
        assert mine.keys() == expected.keys()
        for e, w in expected.items():
            assert mine[e] == pytest.approx(w, abs=1e-2)
