"""Triton MoE over packed MXFP4 experts (gptoss.kernels.moe_triton) against the PyTorch reference moe().

GPU tests need CUDA and triton. Without a GPU the interpreter tests run the same kernels on the CPU with tiny
shapes through Triton's interpreter (see conftest).
"""

import pytest
import torch

from conftest import TRITON_INTERPRET_TESTS as INTERPRET

triton = pytest.importorskip("triton")

from gptoss.experts import MXFP4Experts  # noqa: E402
from gptoss.kernels.moe import moe, route, swiglu  # noqa: E402
from gptoss.kernels.moe_elementwise import fp4_unscaled, scale_value, swiglu_rounded  # noqa: E402
from gptoss.kernels.moe_gemm_triton import _dot_configs  # noqa: E402
from gptoss.kernels.moe_gemv import _gemv_configs  # noqa: E402
from gptoss.kernels.moe_grouping import GROUP_ONEHOT, group_pairs  # noqa: E402
from gptoss.kernels.moe_triton import moe_triton  # noqa: E402

tl = pytest.importorskip("triton.language")

GPU = torch.cuda.is_available() and not INTERPRET


def make_layer(E, H, I, device, seed=0, scales=(118, 125)):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mlp1 = MXFP4Experts(E, 2 * I, H, device=device)
    mlp2 = MXFP4Experts(E, H, I, device=device)
    for store in (mlp1, mlp2):
        store.blocks.copy_(torch.randint(0, 256, store.blocks.shape, generator=g, dtype=torch.uint8))
        store.scales.copy_(torch.randint(*scales, store.scales.shape, generator=g, dtype=torch.uint8))
    b1 = (torch.randn(E, 2 * I, generator=g) * 0.5).to(torch.bfloat16).to(device)
    b2 = (torch.randn(E, H, generator=g) * 0.5).to(torch.bfloat16).to(device)
    return mlp1, b1, mlp2, b2


def make_tokens(N, E, H, K, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(torch.bfloat16).to(device)
    logits = torch.randn(N, E, generator=g).to(device)
    w, ids = route(logits, K)
    return x, w.to(torch.bfloat16), ids


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Intermediate buffers start as NaN: an element the kernels fail to write poisons the output."""
    import gptoss.kernels

    monkeypatch.setattr(gptoss.kernels, "POISON_SCRATCH", True)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# The interpreter's float -> bf16 casts truncate instead of rounding: the expert outputs and the result are each
# biased by up to one ulp, so it gets twice the GPU's tolerance.
TOL = 2e-2 if INTERPRET else 1e-2


def check(N, E, H, I, K, device, path="auto", config=None, seed=0, tol=TOL, denorm=None, scales=(118, 125),
          against_triton=None):
    """moe_triton against the pure moe() (relative error <= tol); against_triton: also against moe_triton's own
    GEMM (path gemm_triton, autotuned) within that bound, for the tensor-core kernels, which compute the same
    exact products and differ only in summation order."""
    mlp1, b1, mlp2, b2 = make_layer(E, H, I, device, seed=seed, scales=scales)
    x, w, ids = make_tokens(N, E, H, K, device, seed=seed + 100)
    ref = moe(x, w, ids, mlp1, b1, mlp2, b2, 7.0)
    out = torch.full_like(ref, float("nan"))  # poison: the result must be fully written
    out.copy_(moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0,
                         path=path, config=config, denorm=denorm))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= tol, f"N={N} path={path}: relative error {err:.3e}"
    if against_triton is not None:
        other = moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0,
                           path="gemm_triton")
        diff = rel_err(out, other)
        assert diff <= against_triton, f"N={N}: {diff:.3e} from the Triton GEMM"
    return err


def check_residual(N, device, path, config=None):
    """residual= adds the block's residual as the pure path does (sum rounded first); x_float32= is read instead
    of converting x."""
    E, H, I, K = 8, 64, 64, 4
    mlp1, b1, mlp2, b2 = make_layer(E, H, I, device, seed=N)
    x, w, ids = make_tokens(N, E, H, K, device, seed=N + 100)
    residual = torch.randn(N, H, device=device).to(torch.bfloat16) * 4
    ref = residual + moe(x, w, ids, mlp1, b1, mlp2, b2, 7.0)
    out = moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0, path=path,
                     config=config, residual=residual, x_float32=x.float() if path == "gemv" else None)
    assert rel_err(out, ref) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# CPU interpreter (without a GPU, tiny shapes)
# ---------------------------------------------------------------------------------------------------------------
interp_only = pytest.mark.skipif(not INTERPRET, reason="the interpreter runs these where there is no GPU")


@interp_only
@pytest.mark.parametrize("N, block", [(1, 8), (3, 8), (8, 32)])  # 8 tokens (DECODE_MAX_TOKENS): 2 row blocks
def test_interpret_gemv(N, block):
    check(N, E=8, H=64, I=64, K=4, device="cpu", path="gemv",
          config={"BLOCK_U": block, "BLOCK_H": max(block, 16), "BLOCK_K": 32})


@interp_only
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_interpret_residual(path):
    check_residual(3, "cpu", path, {"BLOCK_U": 8, "BLOCK_H": 16, "BLOCK_K": 32} if path == "gemv" else
                   {"BM": 16, "BN": 16, "BK": 32})


@interp_only
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("denorm", [False, True])
@pytest.mark.parametrize("N", [1, 5, 33])
def test_interpret_gemm(N, denorm, swap):
    check(N, E=8, H=64, I=64, K=4, device="cpu", path="gemm", denorm=denorm,
          config={"BM": 16, "BN": 16, "BK": 32, "SWAP": swap})


@interp_only
def test_interpret_uneven_k():
    # H = I = 96: BK = 64 leaves a masked tail step; ROWS / BN do not divide the rows
    check(7, E=4, H=96, I=96, K=2, device="cpu", path="gemm_triton", config={"BM": 16, "BN": 32, "BK": 64})
    check(20, E=4, H=96, I=96, K=2, device="cpu", path="gemm_triton", config={"BM": 32, "BN": 64, "BK": 64, "SWAP": True})
    check(2, E=4, H=96, I=96, K=2, device="cpu", path="gemv", config={"BLOCK_U": 64, "BLOCK_H": 64, "BLOCK_K": 64})


def check_shards(N, E, H, I, K, device, path, config=None, shards=2, seed=0, tol=TOL):
    """Expert-parallel calls (first_expert=, num_experts=): each shard's float32 partial against moe_partial over
    the same experts, and the shards' sum against moe(). Token 0 is routed only to the last shard's experts, so
    the other shards hold none of its pairs (their buffers for it stay NaN: the combine must not read them)."""
    from gptoss.kernels.moe import moe_partial

    mlp1, b1, mlp2, b2 = make_layer(E, H, I, device, seed=seed)
    x, w, ids = make_tokens(N, E, H, K, device, seed=seed + 100)
    ids[0] = torch.arange(E - K, E, device=device)
    held = E // shards
    total = torch.zeros(N, H, dtype=torch.float32, device=device)
    for first in range(0, E, held):
        part = (slice(first, first + held),)
        stores = [MXFP4Experts(held, w.blocks.shape[1], 32 * w.blocks.shape[2], device=device) for w in (mlp1, mlp2)]
        for store, whole in zip(stores, (mlp1, mlp2)):
            store.blocks.copy_(whole.blocks[part])
            store.scales.copy_(whole.scales[part])
        out = moe_triton(x, w, ids, stores[0].blocks, stores[0].scales, b1[part], stores[1].blocks,
                         stores[1].scales, b2[part], 7.0, path=path, config=config, first_expert=first,
                         num_experts=E)
        ref = moe_partial(x, w, ids, stores[0], b1[part], stores[1], b2[part], 7.0, first_expert=first)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        if ref.norm() > 0:
            assert rel_err(out, ref) <= tol, f"experts {first}..: {rel_err(out, ref):.3e}"
        if first < E - held:
            assert not out[0].any()  # token 0 has no pair here
        total += out
    assert rel_err(total.to(x.dtype), moe(x, w, ids, mlp1, b1, mlp2, b2, 7.0)) <= tol


@interp_only
@pytest.mark.parametrize("path, config", [
    ("gemv", {"BLOCK_U": 8, "BLOCK_H": 16, "BLOCK_K": 32}),
    ("gemm_triton", {"BM": 16, "BN": 16, "BK": 32}),
    ("gemm_dense", None),
])
def test_interpret_expert_shards(path, config):
    if path == "gemm_dense" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    check_shards(3 if path == "gemv" else 9, E=8, H=64, I=64, K=4, device="cpu", path=path, config=config)


def test_expert_shard_refuses_a_residual():
    mlp1, b1, mlp2, b2 = make_layer(4, 64, 64, "cpu")
    x, w, ids = make_tokens(2, 4, 64, 2, "cpu")
    with pytest.raises(ValueError, match="no residual"):
        moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0, residual=x,
                   first_expert=0, num_experts=8)


@triton.jit
def _dequant_kernel(b_ptr, s_ptr, lo_ptr, hi_ptr, n, BLOCK: tl.constexpr, DENORM: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    lo, hi = fp4_unscaled(tl.load(b_ptr + offs, mask=m, other=0), DENORM)
    sc = scale_value(tl.load(s_ptr + offs, mask=m, other=127))
    lo, hi = lo * sc, hi * sc
    tl.store(lo_ptr + offs, lo, mask=m)
    tl.store(hi_ptr + offs, hi, mask=m)


def _dequant_all_bytes(device, denorm):
    """Every byte 0..255 under scales 100..150 through the kernels' _mxfp4_dequant vs mxfp4.dequantize."""
    from gptoss import mxfp4

    scales = torch.arange(100, 151, dtype=torch.uint8)
    blocks = torch.arange(256, dtype=torch.uint8)
    b = blocks.repeat(len(scales)).to(device)  # (S * 256,)
    s = scales.repeat_interleave(256).to(device)
    lo, hi = torch.empty(b.shape, device=device), torch.empty(b.shape, device=device)
    _dequant_kernel[(triton.cdiv(b.numel(), 256),)](b, s, lo, hi, b.numel(), BLOCK=256, DENORM=denorm)
    ref = mxfp4.dequantize(blocks.repeat(len(scales), 1).view(len(scales), 16, 16),
                           scales.repeat_interleave(16).view(len(scales), 16), torch.float32)  # (S, 512)
    got = torch.stack((lo, hi), -1).view(len(scales), 512).cpu()
    assert torch.equal(got, ref)
    assert torch.equal(torch.signbit(got), torch.signbit(ref))


@interp_only
@pytest.mark.parametrize("denorm", [False, True])
def test_interpret_dequant_exact(denorm):
    _dequant_all_bytes("cpu", denorm)


@triton.jit
def _swiglu_kernel(h_ptr, out_ptr, n_units, BLOCK: tl.constexpr, DT: tl.constexpr):
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = u < n_units
    glu = tl.load(h_ptr + 2 * u, mask=m, other=0.0)
    lin = tl.load(h_ptr + 2 * u + 1, mask=m, other=0.0)
    tl.store(out_ptr + u, swiglu_rounded(glu, lin, 7.0, DT), mask=m)


def _swiglu_rounds_as_torch(device):
    """The kernels' SwiGLU on float32 mlp1 outputs equals the pure path's swiglu on those outputs rounded to bf16
    (torch rounds each op's result to bf16): the same value in at least 99.9% of units (tl.sigmoid and torch's
    sigmoid may differ in the last float32 bit, which can flip a rounding), off by at most one bf16 step elsewhere.
    In float32 it is the plain formula."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1 << 16, 2, generator=g) * 4).to(device)  # units x (glu, lin), beyond the clamp too
    for dtype, tl_dtype in ((torch.bfloat16, tl.bfloat16), (torch.float32, tl.float32)):
        out = torch.empty(h.shape[0], device=device)
        _swiglu_kernel[(triton.cdiv(h.shape[0], 1024),)](h, out, h.shape[0], BLOCK=1024, DT=tl_dtype)
        ref = swiglu(h.reshape(1, -1).to(dtype), 7.0).float().reshape(-1)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            continue
        assert (out == ref).float().mean() >= 0.999
        assert ((out - ref).abs() <= ref.abs() * 2**-7 + 1e-30).all()


@interp_only
def test_interpret_swiglu_rounds_as_torch():
    _swiglu_rounds_as_torch("cpu")


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
ONE_CHUNK = GROUP_ONEHOT // 32  # pairs of 32 experts that one program groups alone


@pytest.mark.parametrize("pairs, experts", [(1, 32), (3, 32), (64, 32), (256, 32), (ONE_CHUNK, 32), (40, 128),
                                            (ONE_CHUNK + 1, 32), (4096, 32), (20000, 32), (1000, 128), (2000, 128)])
def test_group_pairs_is_a_stable_sort(pairs, experts):
    """The grouping equals a stable sort by expert: in one program up to a chunk of pairs, above that in chunks
    placed after the counts of those before them (2,000 pairs of 128 experts: 63 chunks, whose counts the second
    kernel reads in two blocks); skewed ids leave some experts without pairs."""
    if not (GPU or INTERPRET):
        pytest.skip("needs CUDA or the interpreter")
    device = "cuda" if GPU else "cpu"
    g = torch.Generator().manual_seed(pairs)
    ids = (torch.randint(0, experts, (pairs,), generator=g) // torch.randint(1, 4, (pairs,), generator=g))
    ids = ids.to(torch.int32).to(device)
    order, seg_end = group_pairs(ids, experts)
    expected = torch.sort(ids.cpu(), stable=True).indices.to(torch.int32)
    assert torch.equal(order.cpu(), expected)
    assert torch.equal(seg_end.cpu(), torch.bincount(ids.cpu().long(), minlength=experts).cumsum(0).to(torch.int32))


gpu_only = pytest.mark.skipif(not GPU, reason="needs CUDA")


@gpu_only
@pytest.mark.parametrize("denorm", [False, True])
def test_gpu_dequant_exact(denorm):
    _dequant_all_bytes("cuda", denorm)


@gpu_only
def test_gpu_swiglu_rounds_as_torch():
    _swiglu_rounds_as_torch("cuda")


@gpu_only
@pytest.mark.parametrize("N", [1, 3, 127, 128, 129])
def test_gpu_small_shapes(N):
    check(N, E=8, H=256, I=128, K=4, device="cuda", seed=N)


@gpu_only
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("N", [1, 2, 5, 8])
def test_gpu_both_paths_decode_sizes(N, path):
    check(N, E=32, H=2880, I=2880, K=4, device="cuda", path=path, seed=10 + N)


@gpu_only
@pytest.mark.parametrize("index", range(len(_gemv_configs("BLOCK_H", False))))
def test_gpu_every_gemv_tile_candidate(index):
    """The GEMV autotuner may pick any candidate: each must compute the same function (decode sizes, real shapes)."""
    mlp1, mlp2 = _gemv_configs("BLOCK_U", True)[index], _gemv_configs("BLOCK_H", False)[index]
    config = {"BLOCK_U": mlp1.kwargs["BLOCK_U"], "BLOCK_H": mlp2.kwargs["BLOCK_H"], "BLOCK_K": mlp2.kwargs["BLOCK_K"],
              "num_warps": mlp2.num_warps}
    check(3, E=32, H=2880, I=2880, K=4, device="cuda", path="gemv", seed=80 + index, config=config)


@gpu_only
@pytest.mark.parametrize("mlp1", [True, False])
@pytest.mark.parametrize("index", range(len(_dot_configs(True, scaled=True))))
def test_gpu_every_gemm_tile_candidate(index, mlp1):
    """The autotuner may pick any candidate (bf16 activations: the dot_scaled tiles too): each must compute the same
    function (at a batched-decode size). A fixed config runs both GEMM kernels, so a candidate meant for one kernel
    may not fit the other: that one is skipped, as the autotuner skips it."""
    candidate = _dot_configs(mlp1, scaled=True)[index]
    try:
        check(48, E=32, H=2880, I=2880, K=4, device="cuda", path="gemm_triton", seed=60 + index,
              config=dict(candidate.kwargs, num_warps=candidate.num_warps, num_stages=candidate.num_stages))
    except triton.runtime.errors.OutOfResources:
        pytest.skip(f"{candidate} does not fit both kernels")


@gpu_only
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_gpu_residual(path):
    check_residual(5, "cuda", path)


@gpu_only
@pytest.mark.parametrize("N", [1, 3])
def test_gpu_gemv_masked_tails(N):
    check(N, E=8, H=96, I=96, K=2, device="cuda", path="gemv", seed=40 + N,
          config={"BLOCK_U": 64, "BLOCK_H": 64, "BLOCK_K": 64})
    check(N, E=8, H=96, I=96, K=2, device="cuda", path="gemm_triton", seed=50 + N,
          config={"BM": 64, "BN": 64, "BK": 64, "SWAP": N == 3, "num_warps": 4, "num_stages": 3})
    check(N, E=8, H=96, I=96, K=2, device="cuda", path="gemm_triton", seed=60 + N,  # dot_scaled, K tail masked
          config={"BM": 16, "BN": 64, "BK": 128, "SCALED": True, "num_warps": 4, "num_stages": 3})


@gpu_only
@pytest.mark.parametrize("N", [1, 3, 127, 128, 129, 4097])
def test_gpu_real_shapes(N):
    # gpt-oss-20b expert shapes
    check(N, E=32, H=2880, I=2880, K=4, device="cuda", seed=20 + N)


def check_skewed_routing(path: str, seed: int):
    """All tokens on the same 4 experts (one expert segment spans many tiles)."""
    E, H, I, K, N = 32, 2880, 2880, 4, 1000
    mlp1, b1, mlp2, b2 = make_layer(E, H, I, "cuda", seed=seed)
    x, _, _ = make_tokens(N, E, H, K, "cuda", seed=seed + 1)
    logits = torch.randn(N, E, device="cuda")
    logits[:, 3:7] += 100.0
    w, ids = route(logits, K)
    w = w.to(torch.bfloat16)
    ref = moe(x, w, ids, mlp1, b1, mlp2, b2, 7.0)
    out = moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0, path=path)
    assert rel_err(out, ref) <= 1e-2


@gpu_only
def test_gpu_skewed_routing():
    check_skewed_routing("auto", seed=5)


@gpu_only
@pytest.mark.parametrize("N", [1, 16])
def test_gpu_cuda_graph(N):
    """No host sync on either path: the call captures into a CUDA graph and replays on new inputs."""
    E, H, I, K = 32, 2880, 2880, 4
    mlp1, b1, mlp2, b2 = make_layer(E, H, I, "cuda", seed=7)
    x, w, ids = make_tokens(N, E, H, K, "cuda", seed=8)
    args = (mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0)
    moe_triton(x, w, ids, *args)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_triton(x, w, ids, *args)
    x2, w2, ids2 = make_tokens(N, E, H, K, "cuda", seed=9)
    x.copy_(x2), w.copy_(w2), ids.copy_(ids2)
    graph.replay()
    ref = moe(x, w, ids, mlp1, b1, mlp2, b2, 7.0)
    assert rel_err(out, ref) <= 1e-2


# ---------------------------------------------------------------------------------------------------------------
# The tensor-core grouped GEMM (gptoss.kernels.moe_mma), which path="gemm" picks on GPUs where it serves
# ---------------------------------------------------------------------------------------------------------------
def _mma_configs():
    from gptoss.kernels.moe_mma import _CONFIGS, HAS_GLUON

    return _CONFIGS if HAS_GLUON else []


mma_only = pytest.mark.skipif(not GPU, reason="needs CUDA")


@mma_only
@pytest.mark.parametrize("tile", _mma_configs())
def test_gpu_every_mma_tile_candidate(tile):
    """Each candidate the autotuner may pick computes the same function: against the pure path and, tighter,
    against the Triton GEMM (batched-decode and prefill sizes, real shapes)."""
    config = dict(zip(("R", "T", "num_warps"), tile))
    for N in (48, 300):
        check(N, E=32, H=2880, I=2880, K=4, device="cuda", path="gemm_mma", seed=90 + N, config=config,
              against_triton=3e-3)


@mma_only
@pytest.mark.parametrize("N", [1, 3, 40])
def test_gpu_mma_tails(N):
    """An odd number of 32-input blocks (H = I = 96: 3), weight rows fewer than a tile (192 / 96 rows), tokens
    fewer than a tile, and the largest scale byte the kernels take (128)."""
    for config in ({"R": 128, "T": 16, "num_warps": 4}, {"R": 64, "T": 8, "num_warps": 4},
                   {"R": 256, "T": 32, "num_warps": 8}):
        check(N, E=8, H=96, I=96, K=2, device="cuda", path="gemm_mma", seed=70 + N, config=config,
              scales=(120, 129), against_triton=3e-3)


@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("N", [1, 5, 64, 600])
@pytest.mark.parametrize("shards", [2, 4])
def test_gpu_expert_shards(N, shards):
    """Expert-parallel calls at 20b shapes on each path "auto" takes (GEMV, tensor-core GEMMs) against
    moe_partial."""
    check_shards(N, E=32, H=2880, I=2880, K=4, device="cuda", path="auto", shards=shards, seed=N)


@mma_only
def test_gpu_mma_large_scales_fall_back():
    """A scale byte above 128 would overflow the kernels' bf16 multiplier: path gemm then takes the Triton GEMM
    (and stays exact), and forcing gemm_mma is refused."""
    check(40, E=8, H=96, I=96, K=2, device="cuda", path="gemm", seed=3, scales=(126, 131))
    mlp1, b1, mlp2, b2 = make_layer(8, 96, 96, "cuda", seed=3, scales=(126, 131))
    x, w, ids = make_tokens(40, 8, 96, 2, "cuda", seed=4)
    with pytest.raises(ValueError, match="does not serve"):
        moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0, path="gemm_mma")


# ---------------------------------------------------------------------------------------------------------------
# The Hopper grouped GEMM (gptoss.kernels.moe_wgmma), which path="gemm" picks above MMA_MAX_TOKENS on sm_90
# ---------------------------------------------------------------------------------------------------------------
def _wgmma_configs():
    from gptoss.kernels.moe_wgmma import _CONFIGS, HAS_WGMMA

    return _CONFIGS if HAS_WGMMA else []


wgmma_only = pytest.mark.skipif(not GPU or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")


@wgmma_only
@pytest.mark.parametrize("tile", _wgmma_configs())
def test_gpu_every_wgmma_tile_candidate(tile):
    """Each candidate the autotuner may pick computes the same function: against the pure path and, tighter,
    against the Triton GEMM (a short and a long prefill, real shapes)."""
    config = dict(zip(("R", "T", "num_warps"), tile))
    for N in (300, 1100):
        check(N, E=32, H=2880, I=2880, K=4, device="cuda", path="gemm_wgmma", seed=95 + N, config=config,
              against_triton=3e-3)


@wgmma_only
@pytest.mark.parametrize("N", [1, 3, 40, 129])
def test_gpu_wgmma_tails(N):
    """Fewer 32-input blocks than a step takes (H = I = 96: 3), weight rows fewer than a tile, tokens fewer than a
    tile and an expert's rows over several tiles, and the largest scale byte the kernels take (128)."""
    for config in ({"R": 128, "T": 64, "num_warps": 8}, {"R": 64, "T": 128, "num_warps": 4}):
        check(N, E=8, H=96, I=96, K=2, device="cuda", path="gemm_wgmma", seed=75 + N, config=config,
              scales=(120, 129), against_triton=3e-3)


@wgmma_only
def test_gpu_hopper_gemm_dispatch(monkeypatch):
    """On sm_90 path "gemm" takes moe_mma up to MMA_MAX_TOKENS, moe_wgmma above, the dense GEMM from
    MIN_ROWS_PER_EXPERT rows an expert; GPTOSS_MOE_GEMM=triton leaves this module's GEMM in their place."""
    from gptoss.kernels.moe_dense import MIN_ROWS_PER_EXPERT
    from gptoss.kernels.moe_triton import MMA_MAX_TOKENS, _gemm_kernels

    x = torch.zeros(1, 2880, dtype=torch.bfloat16, device="cuda")
    scales = torch.full((32, 5760, 90), 127, dtype=torch.uint8, device="cuda")
    dense_from = MIN_ROWS_PER_EXPERT * 32 // 4  # tokens of 4 pairs
    assert _gemm_kernels(MMA_MAX_TOKENS, 4 * MMA_MAX_TOKENS, x, scales, scales) == "gemm_mma"
    assert _gemm_kernels(MMA_MAX_TOKENS + 1, 4 * (MMA_MAX_TOKENS + 1), x, scales, scales) == "gemm_wgmma"
    assert _gemm_kernels(dense_from - 1, 4 * (dense_from - 1), x, scales, scales) == "gemm_wgmma"
    assert _gemm_kernels(dense_from, 4 * dense_from, x, scales, scales) == "gemm_dense"
    assert _gemm_kernels(dense_from, 2 * dense_from, x, scales, scales) == "gemm_wgmma"  # a shard's share
    monkeypatch.setenv("GPTOSS_MOE_GEMM", "triton")
    assert _gemm_kernels(1024, 4096, x, scales, scales) == "gemm_triton"


@wgmma_only
def test_gpu_wgmma_skewed_routing_and_large_scales():
    """All tokens on 4 experts (each expert's rows span many tiles); scale bytes above 128 make path gemm take
    the Triton GEMM, and forcing gemm_wgmma is refused."""
    check_skewed_routing("gemm_wgmma", seed=15)
    check(300, E=8, H=96, I=96, K=2, device="cuda", path="gemm", seed=3, scales=(126, 131))
    mlp1, b1, mlp2, b2 = make_layer(8, 96, 96, "cuda", seed=3, scales=(126, 131))
    x, w, ids = make_tokens(300, 8, 96, 2, "cuda", seed=4)
    with pytest.raises(ValueError, match="does not serve"):
        moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0, path="gemm_wgmma")


# ---------------------------------------------------------------------------------------------------------------
# The dequantizing grouped GEMM (gptoss.kernels.moe_dense): bf16 experts and torch's grouped GEMM
# ---------------------------------------------------------------------------------------------------------------
@interp_only
@pytest.mark.parametrize("N, chunk_rows", [(1, 65536), (5, 65536), (33, 65536), (33, 7)])
def test_interpret_dense_gemm(N, chunk_rows, monkeypatch):
    """Pure-path equality through the interpreter (bf16 activations; experts with no rows included), also with
    mlp1 run in chunks of sorted rows whose boundaries cut through experts' segments."""
    from gptoss.kernels import moe_dense

    if not moe_dense.dense_gemm_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this torch has no F.grouped_mm")
    monkeypatch.setattr(moe_dense, "CHUNK_ROWS", chunk_rows)
    mlp1, b1, mlp2, b2 = make_layer(8, 64, 64, "cpu", seed=N)
    x, w, ids = make_tokens(N, 8, 64, 4, "cpu", seed=N + 100)
    ref = moe(x, w, ids, mlp1, b1, mlp2, b2, 7.0)
    out = moe_triton(x, w, ids, mlp1.blocks, mlp1.scales, b1, mlp2.blocks, mlp2.scales, b2, 7.0, path="gemm_dense")
    assert rel_err(out, ref) <= TOL


@interp_only
def test_interpret_dequantize_augmented_is_exact():
    """Every FP4 code at every scale in range becomes its exact bf16 value; the bias sits in column K, zeros after."""
    from gptoss.kernels.moe_dense import dequantize_augmented, padded_columns
    from gptoss.mxfp4 import dequantize

    mlp1, b1, _, _ = make_layer(4, 64, 64, "cpu", seed=7, scales=(100, 140))
    out = dequantize_augmented(mlp1.blocks, mlp1.scales, b1)
    K = 64
    assert out.shape == (4, 128, padded_columns(K)) and out.dtype == torch.bfloat16
    assert torch.equal(out[..., :K].float(), dequantize(mlp1.blocks, mlp1.scales).float())
    assert torch.equal(out[..., K], b1)
    assert not out[..., K + 1:].any()


@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("N, chunk_rows", [(129, 65536), (600, 65536), (2048, 65536), (4097, 65536), (4097, 5000)])
def test_gpu_dense_gemm(N, chunk_rows, monkeypatch):
    """Real shapes on the GPU (CUTLASS grouped GEMM on sm_90): against the pure path and the Triton GEMM, also with
    mlp1 in chunks of sorted rows."""
    from gptoss.kernels import moe_dense

    if not moe_dense.dense_gemm_available(torch.zeros(1, dtype=torch.bfloat16, device="cuda")):
        pytest.skip("this torch has no F.grouped_mm")
    monkeypatch.setattr(moe_dense, "CHUNK_ROWS", chunk_rows)
    check(N, E=32, H=2880, I=2880, K=4, device="cuda", path="gemm_dense", seed=N, against_triton=3e-3)


@pytest.mark.skipif(not GPU, reason="needs CUDA")
def test_gpu_dense_gemm_dispatch(monkeypatch):
    """Path "auto" takes the dense GEMM on Hopper from MIN_ROWS_PER_EXPERT rows an expert, for 20b's 32 experts
    but not 120b's 128 (scratch), and never with GPTOSS_MOE_GEMM=triton."""
    from gptoss.kernels.moe_dense import MIN_ROWS_PER_EXPERT, dense_gemm_pays

    x = torch.zeros(1, 2880, dtype=torch.bfloat16, device="cuda")
    scales_20b = torch.zeros(32, 5760, 90, dtype=torch.uint8, device="cuda")
    scales_120b = torch.zeros(128, 5760, 90, dtype=torch.uint8, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert dense_gemm_pays(x, 32 * MIN_ROWS_PER_EXPERT, scales_20b) == hopper
    assert not dense_gemm_pays(x, 32 * MIN_ROWS_PER_EXPERT - 1, scales_20b)
    assert not dense_gemm_pays(x, 128 * 4096, scales_120b)
    monkeypatch.setenv("GPTOSS_MOE_GEMM", "triton")
    assert not dense_gemm_pays(x, 32 * 4096, scales_20b)
