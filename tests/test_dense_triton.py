"""The small Triton kernels of a decode step against the pure path: RMSNorm (alone and fused with the residual add),
MoE routing (top-K + softmax) and the GEMV of the dense projections (with and without the fused RMSNorm).

Runs on a CUDA GPU with Triton; without one, through Triton's interpreter on the CPU (tiny shapes; see conftest).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_INTERPRET_TESTS as INTERPRET
from conftest import require_triton_device

triton = require_triton_device()

from gptoss.kernels.linear_triton import GEMV_MAX_TOKENS, gemv  # noqa: E402
from gptoss.kernels.moe import route  # noqa: E402
from gptoss.kernels.norm_triton import add_rms_norm, rms_norm, rms_norm_reference  # noqa: E402
from gptoss.kernels.route_triton import route_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
EPS = 1e-5
ROWS = [(1, 64), (5, 100), (3, 2880)] if INTERPRET else [(1, 2880), (129, 2880), (4097, 2880)]


def within_one_ulp(out, ref):
    """bf16 results at most one ulp apart element-wise (the interpreter's fp32 -> bf16 cast truncates)."""
    return ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("n, dim", ROWS)
def test_rms_norm(n, dim):
    torch.manual_seed(n)
    x = torch.randn(n, dim, device=DEVICE, dtype=torch.bfloat16) * 3
    scale = torch.rand(dim, device=DEVICE) + 0.5
    out = rms_norm(x, scale, EPS)
    assert out.dtype == x.dtype and not torch.isnan(out).any()
    assert within_one_ulp(out, rms_norm_reference(x, scale, EPS))


@pytest.mark.parametrize("n, dim", ROWS)
def test_add_rms_norm(n, dim):
    torch.manual_seed(n + 1)
    x = torch.randn(n, dim, device=DEVICE, dtype=torch.bfloat16) * 3
    update = torch.randn(n, dim, device=DEVICE, dtype=torch.bfloat16)
    scale = torch.rand(dim, device=DEVICE) + 0.5
    h, t, t32 = add_rms_norm(x, update, scale, EPS, with_float32=True)
    # on the GPU the residual stream rounds exactly as torch's add
    assert within_one_ulp(h, x + update) if INTERPRET else torch.equal(h, x + update)
    assert within_one_ulp(t, rms_norm_reference(h, scale, EPS))
    assert t32.dtype == torch.float32 and torch.equal(t32, t.float())
    assert add_rms_norm(x, update, scale, EPS)[2] is None


@pytest.mark.parametrize("n, experts, k", [(1, 32, 4), (7, 128, 4), (3, 5, 2)] if INTERPRET else
                         [(1, 32, 4), (4097, 32, 4), (129, 128, 4), (3, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route(n, experts, k, dtype):
    torch.manual_seed(n * experts)
    logits = torch.randn(n, experts, device=DEVICE).to(dtype)
    weights, ids = route_triton(logits, k)
    ref_weights, ref_ids = route(logits, k)  # sorted: descending logits, as the kernel gives them
    assert ids.dtype == torch.int32 and weights.dtype == dtype
    # the same top-K logits in the same order (bf16 logits do tie, and torch.topk breaks ties its own way) ...
    assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, ref_ids))
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # ... from K distinct experts
    # ... and the same ids wherever the top K + 1 logits of a row are distinct
    top = logits.float().topk(min(k + 1, experts), dim=1).values
    untied = (top.diff(dim=1) != 0).all(1)
    assert untied.any() and torch.equal(ids.long()[untied], ref_ids[untied])
    torch.testing.assert_close(weights, ref_weights, rtol=2**-7, atol=1e-6)


def test_route_ties_take_the_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=DEVICE)
    weights, ids = route_triton(logits, 2)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]], device=DEVICE))


GEMV_SHAPES = [(40, 96), (7, 64)] if INTERPRET else [(5120, 2880), (2880, 4096), (32, 2880), (201, 100)]
# several steps a row, and one step taking the whole row (as the 4096-input tiles do); on the GPU also the autotuned
GEMV_CONFIGS = ([{"BLOCK_R": 8, "BLOCK_K": 32}, {"BLOCK_R": 16, "BLOCK_K": 64}, {"BLOCK_R": 2, "BLOCK_K": 128}]
                if INTERPRET else [None, {"BLOCK_R": 2, "BLOCK_K": 4096, "num_warps": 8}])


@pytest.mark.parametrize("config", GEMV_CONFIGS)
@pytest.mark.parametrize("r, k", GEMV_SHAPES)
@pytest.mark.parametrize("n", sorted({1, 3, GEMV_MAX_TOKENS}))
def test_gemv(n, r, k, config):
    torch.manual_seed(n * r + k)
    x = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(r, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    b = torch.randn(r, device=DEVICE, dtype=torch.bfloat16)
    out = gemv(x, w, b, config=config)
    assert out.dtype == x.dtype and out.shape == (n, r)
    exact = F.linear(x.float(), w.float(), b.float())
    assert within_one_ulp(out, exact.to(torch.bfloat16))  # one rounding of a float32 sum: at most 1 ulp apart

    scale = torch.rand(k, device=DEVICE) + 0.5
    out = gemv(x, w, norm_scale=scale, eps=EPS, config=config)
    exact = F.linear(rms_norm_reference(x, scale, EPS).float(), w.float())
    # the interpreter's fp32 -> bf16 cast truncates the normed input: a bias the GPU's rounding does not have
    assert ((out.float() - exact).norm() / exact.norm()).item() <= (1e-2 if INTERPRET else 4e-3)


def test_gemv_rejects_too_many_tokens():
    x = torch.zeros(GEMV_MAX_TOKENS + 1, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most"):
        gemv(x, torch.zeros(8, 64, device=DEVICE, dtype=torch.bfloat16))
