"""Triton attention kernels (gptoss.kernels.attention_triton) against the pure reference.

Runs on a CUDA GPU with Triton; without one, a tiny-shape variant runs through Triton's interpreter on the CPU
(see conftest).
"""

import pytest
import torch

from conftest import TRITON_INTERPRET_TESTS as INTERPRET
from conftest import require_triton_device

triton = require_triton_device()

from gptoss.kernels.attention import attention_mask, sink_attention  # noqa: E402
from gptoss.kernels.attention_triton import (  # noqa: E402
    decode_attention,
    prefill_attention,
    rope_and_cache_write,
    rope_reference,
)

DEVICE = "cpu" if INTERPRET else "cuda"
DT = torch.bfloat16
D = 64
SM_SCALE = 0.125
if INTERPRET:  # tiny shapes, small tiles so that tile boundaries are crossed
    HQ, HKV = 8, 2
    PREFILL_KW = dict(block_m=32, block_n=16)
    DECODE_KW = dict(block_n=16)
else:  # the real gpt-oss attention shape
    HQ, HKV = 64, 8
    PREFILL_KW = {}
    DECODE_KW = {}
# Decode computes the reference's function: float32 scores and probabilities, P.V with P kept to ~16 bits (two
# 16-bit parts), one rounding of the output. So nearly every output equals the reference's bits; the others differ
# where float32 summation order or P's last bits cross a rounding boundary (rounding P to bf16 for one MMA changed
# ~75% of them). Prefill rounds P to bf16 for its MMA on the GPU: within half a bf16 ulp of P, not bit-equal.
# (The interpreter multiplies in float32: both kernels are then held to the tight bounds.)
TOL = 1e-3
MAX_DIFFERING = 0.02
PREFILL_TOL, PREFILL_MAX_DIFFERING = (TOL, MAX_DIFFERING) if INTERPRET else (5e-3, None)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def randn(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DT)


def check(out, ref, tol=TOL, max_differing=MAX_DIFFERING):
    assert not torch.isnan(out).any(), "output left unwritten (NaN poison) or NaN"
    err = rel_err(out, ref)
    differing = (out != ref).float().mean().item()
    assert err <= tol and (max_differing is None or differing <= max_differing), \
        f"relative error {err:.3g}, {differing:.1%} of elements differ"


def check_prefill(out, ref):
    check(out, ref, PREFILL_TOL, PREFILL_MAX_DIFFERING)


def nan_like(shape):
    return torch.full(shape, float("nan"), device=DEVICE, dtype=DT)


# --------------------------------------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------------------------------------

if INTERPRET:
    PREFILL_CASES = [  # (N, q_start, k_start, window)
        (1, 0, 0, None), (3, 0, 0, 4), (17, 0, 0, None), (33, 0, 0, 8), (33, 0, 0, 16), (31, 0, 0, 40),
        (20, 13, 0, None), (20, 13, 0, 8), (9, 30, 17, 16), (16, 16, 0, 16),
    ]
else:
    PREFILL_CASES = [
        (1, 0, 0, None), (3, 0, 0, None), (127, 0, 0, None), (128, 0, 0, None), (129, 0, 0, None),
        (4097, 0, 0, None),
        (1, 0, 0, 128), (3, 0, 0, 128), (127, 0, 0, 128), (128, 0, 0, 128), (129, 0, 0, 128), (4097, 0, 0, 128),
        (129, 0, 0, 1), (300, 0, 0, 127),
        # continued prefill over a contiguous cache (q_start > 0)
        (1, 300, 0, None), (129, 300, 0, None), (1000, 3000, 0, None), (129, 300, 0, 128), (77, 4000, 0, 128),
        # sliding layer, keys handed over from position k_start
        (129, 300, 173, 128), (64, 1000, 873, 128), (500, 250, 123, 128),
    ]


@pytest.mark.parametrize("n, q_start, k_start, window", PREFILL_CASES)
def test_prefill_matches_reference(n, q_start, k_start, window):
    torch.manual_seed(n * 7 + q_start)
    s = q_start + n - k_start
    q, k, v = randn(n, HQ, D), randn(s, HKV, D), randn(s, HKV, D)
    sinks = randn(HQ) * 2
    out = nan_like((n, HQ, D))
    res = prefill_attention(q, k, v, sinks, q_start, window, SM_SCALE, k_start, out=out, **PREFILL_KW)
    assert res is out
    q_pos = torch.arange(q_start, q_start + n, device=DEVICE)
    k_pos = torch.arange(k_start, k_start + s, device=DEVICE)
    ref = sink_attention(q, k, v, sinks, attention_mask(q_pos, k_pos, window), SM_SCALE)
    check_prefill(out, ref)


def test_prefill_strided_qkv_views_and_default_scale():
    """q/k/v as views of one fused qkv projection (row stride != heads * D), as the model produces them."""
    torch.manual_seed(1)
    n = 37 if INTERPRET else 333
    qkv = randn(n, (HQ + 2 * HKV) * D)
    q = qkv[:, : HQ * D].view(n, HQ, D)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(n, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(n, HKV, D)
    sinks = randn(HQ)
    out = prefill_attention(q, k, v, sinks, window=16, **PREFILL_KW)  # sm_scale defaults to 1/sqrt(D)
    pos = torch.arange(n, device=DEVICE)
    check_prefill(out, sink_attention(q, k, v, sinks, attention_mask(pos, pos, 16), SM_SCALE))


def test_prefill_large_sinks_and_scores():
    """A sink far above the scores (head attends to ~nothing) and far below (sink negligible)."""
    torch.manual_seed(2)
    n = 40 if INTERPRET else 700
    q, k, v = randn(n, HQ, D) * 3, randn(n, HKV, D) * 3, randn(n, HKV, D)
    sinks = torch.linspace(-30, 30, HQ, device=DEVICE).to(DT)
    out = prefill_attention(q, k, v, sinks, 0, None, SM_SCALE, **PREFILL_KW)
    pos = torch.arange(n, device=DEVICE)
    ref = sink_attention(q, k, v, sinks, attention_mask(pos, pos, None), SM_SCALE)
    assert not torch.isnan(out).any()
    # heads whose sink dominates have ~0 output: compare absolute error against the overall scale
    assert (out.float() - ref.float()).norm() / ref.float().norm() <= PREFILL_TOL


# --------------------------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------------------------


def decode_reference(q, k_flat_per_seq, v_flat_per_seq, sinks, seq_lens, window, slot_of):
    """Per sequence: gather the keys of positions max(0, L-W)..L-1 through slot_of(b, positions) and call
    sink_attention for the one query at position L-1."""
    outs = []
    for b, length in enumerate(seq_lens):
        lo = max(0, length - window) if window else 0
        pos = torch.arange(lo, length, device=DEVICE)
        slots = slot_of(b, pos)
        kb, vb = k_flat_per_seq(b)[slots], v_flat_per_seq(b)[slots]
        mask = attention_mask(torch.tensor([length - 1], device=DEVICE), pos, window)
        outs.append(sink_attention(q[b : b + 1], kb, vb, sinks, mask, SM_SCALE))
    return torch.cat(outs)


if INTERPRET:
    LENS_FULL = [1, 3, 15, 16, 17, 50]
    LENS_RING = [1, 3, 15, 16, 17, 50]
    RING = 16
    SPLITS = [None, 1, 3]
else:
    LENS_FULL = [1, 3, 127, 128, 129, 4097, 1000]
    LENS_RING = [1, 3, 127, 128, 129, 4097, 1000]
    RING = 128
    SPLITS = [None, 1, 3, 16]


@pytest.mark.parametrize("num_splits", SPLITS)
def test_decode_contiguous_full(num_splits):
    torch.manual_seed(3)
    lens = LENS_FULL
    b, s_max = len(lens), max(lens) + 5
    kc, vc = randn(b, s_max, HKV, D), randn(b, s_max, HKV, D)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    out = nan_like((b, HQ, D))
    decode_attention(q, kc, vc, sinks, seq_lens, None, SM_SCALE, out=out, num_splits=num_splits, **DECODE_KW)
    ref = decode_reference(q, lambda i: kc[i], lambda i: vc[i], sinks, lens, None, lambda i, p: p)
    check(out, ref)


@pytest.mark.parametrize("num_splits", SPLITS)
def test_decode_contiguous_ring_window(num_splits):
    """Sliding layer: a ring of W slots, slot = position % W."""
    torch.manual_seed(4)
    lens = LENS_RING
    b = len(lens)
    kc, vc = randn(b, RING, HKV, D), randn(b, RING, HKV, D)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    out = nan_like((b, HQ, D))
    decode_attention(q, kc, vc, sinks, seq_lens, RING, SM_SCALE, out=out, num_splits=num_splits, **DECODE_KW)
    ref = decode_reference(q, lambda i: kc[i], lambda i: vc[i], sinks, lens, RING, lambda i, p: p % RING)
    check(out, ref)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_empty_sequences_give_zeros(paged):
    """seq_len 0 (a padding row of a CUDA-graph batch) reads nothing and writes zeros, not NaN."""
    torch.manual_seed(10)
    b, s_max = 3, 64
    kc, vc = randn(b, s_max, HKV, D), randn(b, s_max, HKV, D)
    block_table = None
    if paged:
        kc, vc = kc.view(b * 4, 16, HKV, D), vc.view(b * 4, 16, HKV, D)
        block_table = torch.arange(b * 4, device=DEVICE, dtype=torch.int32).view(b, 4)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.tensor([0, 5, 0], device=DEVICE, dtype=torch.int32)
    for splits in (1, 4):
        out = nan_like((b, HQ, D))
        decode_attention(
            q, kc, vc, sinks, seq_lens, None, SM_SCALE, block_table=block_table, out=out, num_splits=splits,
            **DECODE_KW,
        )
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
        kf, vf = kc.reshape(b, s_max, HKV, D), vc.reshape(b, s_max, HKV, D)
        check(out[1:2], decode_reference(q[1:2], lambda i: kf[1], lambda i: vf[1], sinks, [5], None, lambda i, p: p))


def test_decode_full_cache_with_window():
    """A window over a non-ring contiguous cache (slot = position) reads only the last W positions."""
    torch.manual_seed(5)
    lens = LENS_FULL
    b, s_max = len(lens), max(lens)
    kc, vc = randn(b, s_max, HKV, D), randn(b, s_max, HKV, D)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    out = decode_attention(q, kc, vc, sinks, seq_lens, RING, SM_SCALE, **DECODE_KW)
    ref = decode_reference(q, lambda i: kc[i], lambda i: vc[i], sinks, lens, RING, lambda i, p: p)
    check(out, ref)


@pytest.mark.parametrize("window", [None, RING])
@pytest.mark.parametrize("block_size", [4, 16] if INTERPRET else [16, 64])
@pytest.mark.parametrize("num_splits", SPLITS)
def test_decode_paged_shuffled(window, block_size, num_splits):
    torch.manual_seed(6 + block_size)
    lens = LENS_FULL
    b = len(lens)
    max_blocks = triton.cdiv(max(lens), block_size) + 1
    num_blocks = b * max_blocks + 3
    kc, vc = randn(num_blocks, block_size, HKV, D), randn(num_blocks, block_size, HKV, D)
    block_table = torch.randperm(num_blocks, device=DEVICE)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    out = nan_like((b, HQ, D))
    decode_attention(
        q, kc, vc, sinks, seq_lens, window, SM_SCALE, block_table=block_table, out=out, num_splits=num_splits,
        **DECODE_KW,
    )
    k_flat, v_flat = kc.view(-1, HKV, D), vc.view(-1, HKV, D)

    def slot_of(i, p):
        return block_table[i, p // block_size].long() * block_size + p % block_size

    ref = decode_reference(q, lambda i: k_flat, lambda i: v_flat, sinks, lens, window, slot_of)
    check(out, ref)


def test_decode_max_context_arg():
    """max_context (a Python int) picks the split count; results do not depend on it."""
    torch.manual_seed(7)
    lens = LENS_FULL
    b, s_max = len(lens), max(lens)
    kc, vc = randn(b, s_max, HKV, D), randn(b, s_max, HKV, D)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    a = decode_attention(q, kc, vc, sinks, seq_lens, None, SM_SCALE, max_context=s_max, **DECODE_KW)
    c = decode_attention(q, kc, vc, sinks, seq_lens, None, SM_SCALE, max_context=16, **DECODE_KW)
    ref = decode_reference(q, lambda i: kc[i], lambda i: vc[i], sinks, lens, None, lambda i, p: p)
    check(a, ref)
    check(c, ref)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_capture():
    """Static grid, no host sync: capture once, then replay with new seq_lens and cache contents."""
    torch.manual_seed(8)
    b, s_max, block_size = 8, 2048, 16
    max_blocks = s_max // block_size
    kc, vc = randn(b * max_blocks, block_size, HKV, D), randn(b * max_blocks, block_size, HKV, D)
    block_table = torch.randperm(b * max_blocks, device=DEVICE).view(b, max_blocks).to(torch.int32)
    q, sinks = randn(b, HQ, D), randn(HQ)
    seq_lens = torch.full((b,), 5, device=DEVICE, dtype=torch.int32)
    for window in (None, RING):
        out = torch.empty(b, HQ, D, device=DEVICE, dtype=DT)
        decode_attention(q, kc, vc, sinks, seq_lens, window, SM_SCALE, block_table=block_table, out=out)  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_attention(q, kc, vc, sinks, seq_lens, window, SM_SCALE, block_table=block_table, out=out)
        for lens in ([1, 2, 3, 4, 5, 6, 7, 8], [2048, 1, 129, 1000, 17, 2047, 128, 600]):
            seq_lens.copy_(torch.tensor(lens, device=DEVICE, dtype=torch.int32))
            q.copy_(randn(b, HQ, D))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            k_flat, v_flat = kc.view(-1, HKV, D), vc.view(-1, HKV, D)

            def slot_of(i, p):
                return block_table[i, p // block_size].long() * block_size + p % block_size

            check(out, decode_reference(q, lambda i: k_flat, lambda i: v_flat, sinks, lens, window, slot_of))


def test_decode_matches_prefill_last_row():
    """Decode at position L-1 equals the last row of a prefill over the same keys."""
    torch.manual_seed(9)
    n = 50 if INTERPRET else 3000
    q, k, v, sinks = randn(n, HQ, D), randn(n, HKV, D), randn(n, HKV, D), randn(HQ)
    for window in (None, RING):
        pre = prefill_attention(q, k, v, sinks, 0, window, SM_SCALE, **PREFILL_KW)
        seq_lens = torch.tensor([n], device=DEVICE, dtype=torch.int32)
        dec = decode_attention(q[-1:], k[None], v[None], sinks, seq_lens, window, SM_SCALE, **DECODE_KW)
        check_prefill(dec, pre[-1:])


# --------------------------------------------------------------------------------------------------------------------
# fused RoPE + cache write
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 33] if INTERPRET else [1, 129, 4097])
@pytest.mark.parametrize("paged", [False, True])
def test_rope_and_cache_write(n, paged):
    torch.manual_seed(n)
    qkv = randn(n, (HQ + 2 * HKV) * D)
    angles = torch.rand(n, D // 2, device=DEVICE) * 100
    cos, sin = angles.cos() * 1.3466, angles.sin() * 1.3466
    if paged:
        block_size = 4
        kc = nan_like((triton.cdiv(n, block_size) + 2, block_size, HKV, D))
    else:
        kc = nan_like((2, n + 3, HKV, D))
    vc = torch.full_like(kc, float("nan"))
    slots = torch.randperm(kc.shape[0] * kc.shape[1], device=DEVICE)[:n]
    slots[0] = -1  # skipped
    q, k = rope_and_cache_write(qkv, cos, sin, HQ, HKV, kc, vc, slots)
    q_ref = rope_reference(qkv[:, : HQ * D].view(n, HQ, D), cos, sin)
    k_ref = rope_reference(qkv[:, HQ * D : (HQ + HKV) * D].view(n, HKV, D), cos, sin)
    v_ref = qkv[:, (HQ + HKV) * D :].view(n, HKV, D)
    # products and sums rounded where apply_rope's torch ops round them: the same bits
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    k_flat, v_flat = kc.view(-1, HKV, D), vc.view(-1, HKV, D)
    written = slots[1:]
    if written.numel():
        assert torch.equal(k_flat[written], k_ref[1:])
        assert torch.equal(v_flat[written], v_ref[1:])
    untouched = torch.ones(k_flat.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.isnan(k_flat[untouched]).all() and torch.isnan(v_flat[untouched]).all()
    q2, k2 = rope_and_cache_write(qkv, cos, sin, HQ, HKV)  # without a cache
    assert torch.equal(q2, q) and torch.equal(k2, k)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0 (sin)
def test_rope_keeps_nan_and_infinity():
    """Rounding on the bits must not turn the GPU's NaN (0x7FFFFFFF, which overflows into the sign bit) into -0."""
    qkv = randn(2, (HQ + 2 * HKV) * D)
    qkv[0, 0] = float("nan")
    qkv[1, 1] = float("inf")
    cos = torch.ones(2, D // 2, device=DEVICE)
    q, _ = rope_and_cache_write(qkv, cos, torch.zeros_like(cos), HQ, HKV)
    q_ref = rope_reference(qkv[:, : HQ * D].view(2, HQ, D), cos, torch.zeros_like(cos))
    assert torch.isnan(q[0, 0, 0]) and torch.isnan(q_ref[0, 0, 0])
    assert torch.isinf(q[1, 0, 1]) and torch.isinf(q_ref[1, 0, 1])
