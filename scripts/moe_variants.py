"""Experiment: alternative Triton kernels for the *decode-size* MoE (1-64 tokens) over packed MXFP4 experts, against
the current `gptoss.kernels.moe_triton.moe_triton` (GEMV for N <= 16, grouped GEMM above).

Every variant computes the same function as moe_triton / gptoss.kernels.moe.moe:
    out[n] = sum_k w[n,k] * (W2[e] @ SwiGLU(W1[e] @ x[n] + b1[e], limit) + b2[e]),  e = ids[n,k]
from the same inputs (x (N,H) bf16, routing weights/ids (N,K), mlp1/mlp2 blocks (E,rows,cols/32,16) uint8, scales
(E,rows,cols/32) uint8, bf16 biases) and returns (N, H) in x's dtype.

Variants
  tc_f16   Tensor-core decode ("SWAP" GEMM with the tokens as the narrow side). Program (row block j, expert slot t)
           finds the t-th distinct routed expert in-kernel (no sort, no host sync), gathers that expert's pairs into
           a BT-column token tile (BT = 8 or 16, several tiles if more pairs) and computes W(R, BK) @ a^T(BK, BT)
           with tl.dot. The weight tile is decoded straight to fp16 with ~1.5 integer ops per weight (two FP4 codes
           per 32-bit op, the same bit trick as moe_triton's _fp4_pair16, no fp16->fp32 converts) and scaled by one
           fp16 multiply by a power of two relative to the row's largest block scale in the K step; the remaining
           2^(s_max - 127) is applied to the fp32 (R, BT) partial product of the step. All scalings are powers of
           two, so the fp16 weights are exact for every block within 2^-23 of the step's largest block of the row
           (smaller blocks are < 2^-23 of it and are rounded / flushed). The FMAs (and the fp16->fp32 converts) of
           the GEMV move to the tensor cores, which are idle in the GEMV. The K order inside each 8-code word is
           permuted (o0 o4 o1 o5 o2 o6 o3 o7: each 32-bit decode result is one contiguous fp16 pair) and the
           activations are loaded in the same permuted order. The next K step's weight words, scales and
           activations are loaded before the current step is decoded (register double buffering, as moe_triton's
           _gemv_rows), because Triton's pipeliner does not pipeline loads that go through a dequant; one autotune
           candidate instead relies on num_stages=3 (PREFETCH=False) for comparison.
           Activations enter the dot as fp16: mlp1's x is multiplied by 2^-6 before the cast (finite up to
           |x| < 2^21; |x| < 2^-8 lose relative precision to fp16 subnormals, ~2e-6 absolute), mlp2's SwiGLU output
           is stored as fp16 (|act| <= limit * (limit + 1) = 56).
  tc_bf16  The same kernels with bf16 operands: FP4 -> fp16 pair -> fp32, times the exact block scale, -> bf16
           (~4-5 ops per weight, like the GEMM path's dequant), activations bf16. No range caveats; it separates
           the effect of the decode-size grid / token tiles / prefetch from that of the cheaper fp16 decode.
  gemv16   moe_triton's GEMV structure (CUDA cores, row-contiguous int32 word tiles, prefetch), but the products
           and the 8-term sums within a word are fp16 (HFMA, no fp16->fp32 convert per weight): ~3 ops per weight
           instead of ~5. The 4 word sums of a 32-block are added in fp32 and scaled there. To keep fp16 products
           normal, a prep kernel (replacing the baseline's x.float()) writes x as fp16 scaled per token by a power
           of two (amax in [2^14, 2^15)); mlp1 writes the SwiGLU output as fp16 times 2^10 (|act| <= 56).
           Grid (row block, expert slot) like tc_*, so one compiled kernel serves every N.

All variants end with the same combine kernel as moe_triton's GEMV path (bias b2 + routing weight + sum over the K
experts of a token in a fixed order, cast), on fp32 per-pair expert outputs.

Static cost (ptxas for sm_90 from this Triton, no GPU; SASS instructions in the K loop per weight and thread, mlp1,
R = 64 rows, BK = 256): baseline GEMV ~5.2-5.4, tc_f16 ~4.5 (HMUL2 through inline PTX; 2 of it are the FP4 decode),
tc_bf16 ~6.2, gemv16 ~5.4 (Triton adds PRMT / LDS around the packed fp16 math), so gemv16 is not run by default.

Usage
  GPU (H100):   python scripts/moe_variants.py [--layers 4] [--ns 1,4,16,64] [--precompile 12] [--variants ...]
  CPU check:    PYTHONPATH=/tmp/np22:. TRITON_INTERPRET=1 python scripts/moe_variants.py --interpret-check
The GPU run prints, per (variant, N): errors against a float32 reference (dequantized experts, gptoss.kernels.moe.moe
in fp32) and the time per layer call from CUDA-graph replay (one graph = one call on each of the L layers, so the
experts come from HBM), with effective GB/s over the bytes of the distinct experts touched (blocks + scales +
biases), then a summary table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gptoss.experts import MXFP4Experts  # noqa: E402
from gptoss.kernels.moe import moe, route  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
CH = 32  # expert ids scanned per chunk by the in-kernel slot / pair search (a constant: one compile for every N)


def log(*a):
    print(*a, flush=True)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _slot_expert(ids_ptr, t, M, EP: tl.constexpr, CH: tl.constexpr):
    """The t-th distinct expert (ascending id) among the M routed pairs; >= E (EP) when fewer are routed."""
    ev = tl.arange(0, EP)
    used = tl.zeros((EP,), dtype=tl.int32)
    for c in range(0, M, CH):
        p = c + tl.arange(0, CH)
        ids = tl.load(ids_ptr + p, mask=p < M, other=-1).to(tl.int32)
        used = tl.maximum(used, tl.max((ids[:, None] == ev[None, :]).to(tl.int32), axis=0))
    csum = tl.cumsum(used, 0)
    return tl.sum((csum <= t).to(tl.int32), 0)


@triton.jit
def _expert_count(ids_ptr, e, M, CH: tl.constexpr):
    cnt = e * 0
    for c in range(0, M, CH):
        p = c + tl.arange(0, CH)
        ids = tl.load(ids_ptr + p, mask=p < M, other=-1).to(tl.int32)
        cnt += tl.sum((ids == e).to(tl.int32), 0)
    return cnt


@triton.jit
def _expert_pairs(ids_ptr, e, M, c0, BT: tl.constexpr, CH: tl.constexpr):
    """(BT,) pair indices of the c0-th .. (c0+BT-1)-th pairs routed to expert e (ascending pair order), valid mask."""
    col = tl.arange(0, BT)
    pairs = tl.zeros((BT,), dtype=tl.int32)
    found = tl.zeros((BT,), dtype=tl.int32)
    run = e * 0
    for c in range(0, M, CH):
        p = c + tl.arange(0, CH)
        sel = (tl.load(ids_ptr + p, mask=p < M, other=-1).to(tl.int32) == e).to(tl.int32)
        pos = run + tl.cumsum(sel, 0) - 1 - c0  # column of each selected pair in this tile
        hit = (sel[:, None] == 1) & (pos[:, None] == col[None, :])  # (CH, BT)
        pairs += tl.sum(tl.where(hit, p[:, None], 0), 0)
        found += tl.sum(hit.to(tl.int32), 0)
        run += tl.sum(sel, 0)
    return pairs, found > 0


@triton.jit
def _swiglu(h_glu, h_lin, limit):
    glu = tl.minimum(h_glu, limit)
    lin = tl.minimum(tl.maximum(h_lin, -limit), limit)
    return glu * tl.sigmoid(1.702 * glu) * (lin + 1.0)


@triton.jit
def _pair16h(wd, K: tl.constexpr):
    """wd: uint32 words (8 FP4 codes: inputs 8q .. 8q+7) -> fp16 values of inputs 8q+K (lo) and 8q+4+K (hi),
    without the block scale and times 2^-14 (code 1 = 0.5 becomes the fp16 subnormal 2^-15: exact)."""
    t = wd >> (4 * K)
    v = ((t << 9) & 0x0E000E00) | ((t << 12) & 0x80008000)
    lo = v.to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, rw_ptr, b_ptr, out_ptr, H: tl.constexpr, K_ROUTE: tl.constexpr,
                    BLOCK: tl.constexpr):
    """out[n] = sum_k w(n,k) * (y[pair] + b2[e(pair)]), pair = n*K + k, fixed order, cast (as moe_triton's GEMV)."""
    n = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    hm = hs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(K_ROUTE):
        p = n * K_ROUTE + k
        e = tl.load(ids_ptr + p).to(tl.int64)
        y = tl.load(y_ptr + p * H + hs, mask=hm, other=0.0) + tl.load(b_ptr + e * H + hs, mask=hm,
                                                                    other=0.0).to(tl.float32)
        acc += tl.load(rw_ptr + p).to(tl.float32) * y
    tl.store(out_ptr + n * H + hs, acc.to(out_ptr.dtype.element_ty), mask=hm)


def _combine(y, ids_flat, rw_flat, b2, out, N, H, K):
    BLOCK = 1024
    _combine_kernel[(N, triton.cdiv(H, BLOCK))](y, ids_flat, rw_flat, b2, out, H=H, K_ROUTE=K, BLOCK=BLOCK,
                                                 num_warps=4)
    return out


def _check_inputs(x, expert_ids, b1, s1, b2, s2):
    N, H = x.shape
    E, R1, G1, _ = b1.shape
    I = R1 // 2
    assert b1.dtype == torch.uint8 and b2.dtype == torch.uint8
    assert G1 * 32 == H and tuple(b2.shape) == (E, H, I // 32, 16) and I % 32 == 0
    assert s1.shape == b1.shape[:-1] and s2.shape == b2.shape[:-1]
    return N, H, E, I, expert_ids.shape[1]


# ----------------------------------------------------------------------------------------------------------------
# Variant tc_f16 / tc_bf16: tensor-core decode
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _tc_load(w_ptr, s_ptr, a_ptr, rows, rmask, arow, amask, k0, KDIM: tl.constexpr, BK: tl.constexpr):
    """Step k0: weight words (R, BK/8) int32 (row-contiguous), scales (R, BK/32) uint8, activations (BT, BK) of the
    operand dtype, stored in memory in the permuted K order the decode produces (see _perm_col), so they load as
    contiguous vectors. Masked past KDIM, so a prefetch beyond the end touches no memory."""
    KW: tl.constexpr = KDIM // 8
    G: tl.constexpr = KDIM // 32
    NG: tl.constexpr = BK // 32
    wi = k0 // 8 + tl.arange(0, BK // 8)
    wd = tl.load(w_ptr + rows[:, None] * KW + wi[None, :], mask=rmask[:, None] & (wi < KW)[None, :], other=0)
    g = k0 // 32 + tl.arange(0, NG)
    s = tl.load(s_ptr + rows[:, None] * G + g[None, :], mask=rmask[:, None] & (g < G)[None, :], other=0)
    kk = k0 + tl.arange(0, BK)
    a = tl.load(a_ptr + arow[:, None] + kk[None, :], mask=amask[:, None] & (kk < KDIM)[None, :], other=0.0)
    return wd, s, a


@triton.jit
def _perm_col(u):
    """Position of input u in the permuted K order: within each 8-input word, inputs 0 4 1 5 2 6 3 7 (the order in
    which _tc_codes lays out the fp16 pairs of _pair16h), i.e. position 2 * (u % 4) + (u % 8) // 4."""
    return (u & -8) + ((u & 3) << 1) + ((u >> 2) & 1)


@triton.jit
def _tc_prep_kernel(x_ptr, xp_ptr, H: tl.constexpr, BH: tl.constexpr, X_MUL: tl.constexpr):
    """xp[n, _perm_col(u)] = x[n, u] * X_MUL in xp's dtype (fp16 or bf16): the dot operand of mlp1, permuted."""
    n = tl.program_id(0)
    u = tl.program_id(1) * BH + tl.arange(0, BH)
    um = u < H
    x = tl.load(x_ptr + n * H + u, mask=um, other=0.0).to(tl.float32) * X_MUL
    tl.store(xp_ptr + n * H + _perm_col(u), x.to(xp_ptr.dtype.element_ty), mask=um)


@triton.jit
def _tc_join(o0, o1, o2, o3, o4, o5, o6, o7):
    """8 (R, W) fp16 tensors (inputs 8q+K of word q) -> (R, W/4, 32) in the permuted order o0 o4 o1 o5 o2 o6 o3 o7
    per word (join nesting: the innermost axis picks the outermost join argument)."""
    R: tl.constexpr = o0.shape[0]
    W: tl.constexpr = o0.shape[1]
    z = tl.join(tl.join(tl.join(o0, o2), tl.join(o1, o3)), tl.join(tl.join(o4, o6), tl.join(o5, o7)))
    return tl.reshape(z, (R, W // 4, 32))


@triton.jit
def _mul_f16x2(v, m2, ASM: tl.constexpr):
    """(fp16 pair in uint32 v) * (fp16 pair in uint32 m2) -> (lo, hi) fp16. ASM: one mul.rn.f16x2 (HMUL2); else
    two fp16 multiplies (the CPU interpreter cannot run inline PTX)."""
    if ASM:
        p = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [v, m2], dtype=tl.uint32,
                                      is_pure=True, pack=1)
        return p.to(tl.uint16).to(tl.float16, bitcast=True), (p >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        m = m2.to(tl.uint16).to(tl.float16, bitcast=True)
        lo = v.to(tl.uint16).to(tl.float16, bitcast=True) * m
        hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True) * m
        return lo, hi


@triton.jit
def _tc_weights_f16(wd, s32, ASM: tl.constexpr):
    """(R, W) int32 words, (R, W/4) int32 block scales -> fp16 weights (R, 8W) (permuted K order) equal to
    code * 2^(s - sref + 1) (<= 12), and sref (R,) = the row's largest block scale in this step.
    Decode: two codes per 32-bit op (code * 2^-14, see _pair16h); the multiplier 2^(s - sref + 15) (fp16 exponent
    field s - sref + 30; 0 for a block < 2^-30 of the row's max, which is flushed) is applied to both halves."""
    R: tl.constexpr = wd.shape[0]
    W: tl.constexpr = wd.shape[1]
    NG: tl.constexpr = W // 4
    sref = tl.max(s32, axis=1)
    mexp = tl.minimum(tl.maximum(s32 - sref[:, None] + 30, 0), 30)
    mb = (mexp << 10).to(tl.uint32)
    mb = tl.reshape(tl.broadcast_to((mb | (mb << 16))[:, :, None], (R, NG, 4)), (R, W))  # per word, both halves
    wu = wd.to(tl.uint32, bitcast=True)
    o0, o4 = _mul_f16x2(((wu << 9) & 0x0E000E00) | ((wu << 12) & 0x80008000), mb, ASM)
    o1, o5 = _mul_f16x2(((wu << 5) & 0x0E000E00) | ((wu << 8) & 0x80008000), mb, ASM)
    o2, o6 = _mul_f16x2(((wu << 1) & 0x0E000E00) | ((wu << 4) & 0x80008000), mb, ASM)
    o3, o7 = _mul_f16x2(((wu >> 3) & 0x0E000E00) | (wu & 0x80008000), mb, ASM)
    return tl.reshape(_tc_join(o0, o1, o2, o3, o4, o5, o6, o7), (R, W * 8)), sref


@triton.jit
def _tc_weights_bf16(wd, s32):
    """(R, W) int32 words, (R, W/4) block scales -> exact bf16 weights (R, 8W) (permuted K order): fp16 pair decode,
    fp32 convert, times 2^(s - 127) * 2^14, bf16."""
    R: tl.constexpr = wd.shape[0]
    W: tl.constexpr = wd.shape[1]
    wu = wd.to(tl.uint32, bitcast=True)
    o0, o4 = _pair16h(wu, 0)
    o1, o5 = _pair16h(wu, 1)
    o2, o6 = _pair16h(wu, 2)
    o3, o7 = _pair16h(wu, 3)
    z = _tc_join(o0, o1, o2, o3, o4, o5, o6, o7)  # (R, NG, 32)
    sc = ((s32 + 14) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127) * 2^14
    return tl.reshape(z.to(tl.float32) * sc[:, :, None], (R, W * 8)).to(tl.bfloat16)


@triton.jit
def _tc_step(acc, wd, s, a, F16: tl.constexpr, X_SHIFT: tl.constexpr, DOT_F32: tl.constexpr):
    s32 = s.to(tl.int32)
    if F16:
        w, sref = _tc_weights_f16(wd, s32, not DOT_F32)
        # the rest of the scale, 2^(sref - 128 + X_SHIFT), is an fp32 (exponent field sref - 1 + X_SHIFT) applied to
        # the step's (R, BT) product
        fr = (tl.minimum(tl.maximum(sref - 1 + X_SHIFT, 0), 254) << 23).to(tl.float32, bitcast=True)
        if DOT_F32:
            d = tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
        else:
            d = tl.dot(w, tl.trans(a))
        acc += d * fr[:, None]
    else:
        w = _tc_weights_bf16(wd, s32)
        if DOT_F32:
            acc = tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(a), acc)
    return acc


@triton.jit
def _tc_rows(w_ptr, s_ptr, rows, rmask, a_ptr, arow, amask, KDIM: tl.constexpr, BK: tl.constexpr,
             BT: tl.constexpr, F16: tl.constexpr, X_SHIFT: tl.constexpr, PREFETCH: tl.constexpr,
             DOT_F32: tl.constexpr):
    """(R, BT) fp32: W[rows, :] @ a[cols, :]^T over KDIM inputs."""
    R: tl.constexpr = rows.shape[0]
    acc = tl.zeros((R, BT), dtype=tl.float32)
    if PREFETCH:
        wd, s, a = _tc_load(w_ptr, s_ptr, a_ptr, rows, rmask, arow, amask, 0, KDIM, BK)
        for k0 in range(0, KDIM, BK):
            wd_n, s_n, a_n = _tc_load(w_ptr, s_ptr, a_ptr, rows, rmask, arow, amask, k0 + BK, KDIM, BK)
            acc = _tc_step(acc, wd, s, a, F16, X_SHIFT, DOT_F32)
            wd, s, a = wd_n, s_n, a_n
    else:
        for k0 in range(0, KDIM, BK):
            wd, s, a = _tc_load(w_ptr, s_ptr, a_ptr, rows, rmask, arow, amask, k0, KDIM, BK)
            acc = _tc_step(acc, wd, s, a, F16, X_SHIFT, DOT_F32)
    return acc


@triton.jit(do_not_specialize=["M", "tune_m"])
def _tc_mlp1_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, b_ptr, act_ptr, M, limit, tune_m,  # x: permuted operand copy
                    H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K_ROUTE: tl.constexpr, EP: tl.constexpr,
                    BU: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, PREFETCH: tl.constexpr,
                    F16: tl.constexpr, X_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, CH: tl.constexpr):
    """act[pair, units] = SwiGLU(W1[e] x[token(pair)] + b1[e]) for rows block j of the t-th distinct expert e."""
    j = tl.program_id(0)
    e = _slot_expert(ids_ptr, tl.program_id(1), M, EP, CH)
    if e >= E:
        return
    R: tl.constexpr = 2 * BU
    local = j * R + tl.arange(0, R)  # rows 2u gate, 2u+1 linear
    rmask = local < 2 * I
    rows = e.to(tl.int64) * (2 * I) + local
    bias = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    units = j * BU + tl.arange(0, BU)
    cnt = _expert_count(ids_ptr, e, M, CH)
    for c0 in range(0, cnt, BT):
        pairs, pm = _expert_pairs(ids_ptr, e, M, c0, BT, CH)
        arow = (pairs // K_ROUTE).to(tl.int64) * H
        acc = _tc_rows(w_ptr, s_ptr, rows, rmask, x_ptr, arow, pm, H, BK, BT, F16, X_SHIFT, PREFETCH,
                       DOT_F32)  # (R, BT)
        h = tl.trans(acc) + bias[None, :]  # (BT, R)
        glu, lin = tl.split(tl.reshape(h, (BT, BU, 2)))
        out = _swiglu(glu, lin, limit)
        # stored in the permuted K order, so mlp2 loads it as contiguous vectors
        tl.store(act_ptr + pairs.to(tl.int64)[:, None] * I + _perm_col(units)[None, :],
                 out.to(act_ptr.dtype.element_ty), mask=pm[:, None] & (units < I)[None, :])


@triton.jit(do_not_specialize=["M", "tune_m"])
def _tc_mlp2_kernel(act_ptr, ids_ptr, w_ptr, s_ptr, y_ptr, M, tune_m,
                    H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                    BH: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, PREFETCH: tl.constexpr,
                    F16: tl.constexpr, DOT_F32: tl.constexpr, CH: tl.constexpr):
    """y[pair, hs] = W2[e][hs] act[pair] (no bias) for output block j of the t-th distinct expert e."""
    j = tl.program_id(0)
    e = _slot_expert(ids_ptr, tl.program_id(1), M, EP, CH)
    if e >= E:
        return
    hs = j * BH + tl.arange(0, BH)
    hmask = hs < H
    rows = e.to(tl.int64) * H + hs
    cnt = _expert_count(ids_ptr, e, M, CH)
    for c0 in range(0, cnt, BT):
        pairs, pm = _expert_pairs(ids_ptr, e, M, c0, BT, CH)
        arow = pairs.to(tl.int64) * I
        acc = _tc_rows(w_ptr, s_ptr, rows, hmask, act_ptr, arow, pm, I, BK, BT, F16, 0, PREFETCH,
                       DOT_F32)  # (BH, BT)
        tl.store(y_ptr + pairs.to(tl.int64)[None, :] * H + hs[:, None], acc, mask=hmask[:, None] & pm[None, :])


# (rows-or-units, BK, BT, PREFETCH, warps, stages). mlp1 counts SwiGLU units (2 weight rows each).
TC1_CONFIGS = [(32, 256, 16, 1, 4, 1), (16, 128, 16, 1, 4, 1), (32, 128, 16, 1, 4, 1), (64, 128, 16, 1, 8, 1),
               (32, 256, 8, 1, 4, 1), (32, 256, 16, 0, 4, 3)]
TC2_CONFIGS = [(64, 256, 16, 1, 4, 1), (32, 256, 16, 1, 4, 1), (64, 128, 16, 1, 4, 1), (128, 128, 16, 1, 8, 1),
               (64, 256, 8, 1, 4, 1), (64, 256, 16, 0, 4, 3)]


def _tc_cfg(t, first: str):
    r, bk, bt, pf, w, s = t
    return triton.Config({first: r, "BK": bk, "BT": bt, "PREFETCH": bool(pf)}, num_warps=w, num_stages=s)


_TUNED: dict = {}


def _tuned(name):
    if name not in _TUNED:
        if name == "tc1":
            _TUNED[name] = triton.autotune([_tc_cfg(c, "BU") for c in TC1_CONFIGS], key=["H", "I", "tune_m", "F16"])(
                _tc_mlp1_kernel)
        elif name == "tc2":
            _TUNED[name] = triton.autotune([_tc_cfg(c, "BH") for c in TC2_CONFIGS], key=["H", "I", "tune_m", "F16"])(
                _tc_mlp2_kernel)
        elif name == "g16_1":
            _TUNED[name] = triton.autotune(_g16_configs("BU", True), key=["H", "I", "tune_m"])(_g16_mlp1_kernel)
        elif name == "g16_2":
            _TUNED[name] = triton.autotune(_g16_configs("BH", False), key=["H", "I", "tune_m"])(_g16_mlp2_kernel)
    return _TUNED[name]


def moe_tc(x, weights, expert_ids, b1, s1, bias1, b2, s2, bias2, swiglu_limit, *, f16=True, config=None):
    """Tensor-core decode MoE (variants tc_f16 / tc_bf16). config: fixed {"BU","BH","BK","BT","PREFETCH",
    "num_warps","num_stages"} for both kernels instead of autotuning (always used under the interpreter)."""
    N, H, E, I, K = _check_inputs(x, expert_ids, b1, s1, b2, s2)
    M = N * K
    dev = x.device
    ids = expert_ids.reshape(-1)
    rw = weights.reshape(-1)
    x = x.contiguous()
    act = torch.empty((M, I), dtype=torch.float16 if f16 else torch.bfloat16, device=dev)
    y = torch.empty((M, H), dtype=torch.float32, device=dev)
    slots = min(M, E)
    EP = _next_pow2(E)
    tune_m = _next_pow2(M)
    common = dict(E=E, EP=EP, F16=f16, DOT_F32=INTERP, CH=CH)
    x_shift = 6 if f16 else 0
    xp = torch.empty((N, H), dtype=act.dtype, device=dev)
    _tc_prep_kernel[(N, triton.cdiv(H, 1024))](x, xp, H=H, BH=1024, X_MUL=2.0 ** -x_shift, num_warps=4)
    if config is None and not INTERP:
        k1, k2 = _tuned("tc1"), _tuned("tc2")
        c1 = c2 = {}
    else:
        c = {"BU": 16, "BH": 32, "BK": 64, "BT": 16, "PREFETCH": True, "num_warps": 4, "num_stages": 1,
             **(config or {})}
        k1, k2 = _tc_mlp1_kernel, _tc_mlp2_kernel
        base = {k: c[k] for k in ("BK", "BT", "PREFETCH", "num_warps", "num_stages")}
        c1, c2 = dict(base, BU=c["BU"]), dict(base, BH=c["BH"])
    k1[lambda m: (triton.cdiv(I, m["BU"]), slots)](
        xp, ids, b1.view(torch.int32), s1, bias1, act, M, float(swiglu_limit), tune_m,
        H=H, I=I, K_ROUTE=K, X_SHIFT=x_shift, **common, **c1)
    k2[lambda m: (triton.cdiv(H, m["BH"]), slots)](
        act, ids, b2.view(torch.int32), s2, y, M, tune_m, H=H, I=I, **common, **c2)
    return _combine(y, ids, rw, bias2, torch.empty_like(x), N, H, K)


# ----------------------------------------------------------------------------------------------------------------
# Variant gemv16: CUDA-core GEMV with fp16 products
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _x16_prep_kernel(x_ptr, x16_ptr, xf_ptr, H: tl.constexpr, BH: tl.constexpr):
    """x16[n] = x[n] * 2^k (fp16, amax in [2^14, 2^15)) and xf[n] = 2^(14 - k) = amax with its mantissa cleared."""
    n = tl.program_id(0)
    hs = tl.arange(0, BH)
    hm = hs < H
    x = tl.load(x_ptr + n * H + hs, mask=hm, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    ef = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF)  # exponent field of amax
    kf = tl.minimum(tl.maximum(268 - ef, 1), 254)  # exponent field of 2^k, k = 141 - ef
    scale = tl.where(ef == 0, 1.0, (kf << 23).to(tl.float32, bitcast=True))
    tl.store(x16_ptr + n * H + hs, (x * scale).to(tl.float16), mask=hm)
    tl.store(xf_ptr + n, tl.where(ef == 0, 0.0, (ef << 23).to(tl.float32, bitcast=True)))


@triton.jit
def _g16_load(w_ptr, s_ptr, v_ptr, rows, rmask, k0, KDIM: tl.constexpr, BK: tl.constexpr):
    KW: tl.constexpr = KDIM // 8
    G: tl.constexpr = KDIM // 32
    NG: tl.constexpr = BK // 32
    wi = k0 // 8 + tl.arange(0, BK // 8)
    wd = tl.load(w_ptr + rows[:, None] * KW + wi[None, :], mask=rmask[:, None] & (wi < KW)[None, :], other=0)
    g = k0 // 32 + tl.arange(0, NG)
    s = tl.load(s_ptr + rows[:, None] * G + g[None, :], mask=rmask[:, None] & (g < G)[None, :], other=0)
    v = tl.load(v_ptr + wi[:, None] * 8 + tl.arange(0, 8)[None, :], mask=(wi < KW)[:, None], other=0.0)  # (W, 8)
    return wd, s, v


@triton.jit
def _g16_rows(w_ptr, s_ptr, rows, rmask, v_ptr, KDIM: tl.constexpr, BK: tl.constexpr):
    """sum_k W[rows, k] * v[k] * 2^14 (v fp16) -> (R,) fp32: fp16 products and 8-term word sums, fp32 above."""
    NG: tl.constexpr = BK // 32
    W: tl.constexpr = BK // 8
    R: tl.constexpr = rows.shape[0]
    acc = tl.zeros((R, NG), dtype=tl.float32)
    wd, s, v = _g16_load(w_ptr, s_ptr, v_ptr, rows, rmask, 0, KDIM, BK)
    for k0 in range(0, KDIM, BK):
        wd_n, s_n, v_n = _g16_load(w_ptr, s_ptr, v_ptr, rows, rmask, k0 + BK, KDIM, BK)
        wu = wd.to(tl.uint32, bitcast=True)
        o0, o4 = _pair16h(wu, 0)
        o1, o5 = _pair16h(wu, 1)
        o2, o6 = _pair16h(wu, 2)
        o3, o7 = _pair16h(wu, 3)
        # v (W, 8) -> its 8 columns (f = 4i + 2j + k of the (W, 2, 2, 2) view; split takes the last axis)
        ve, vo = tl.split(tl.reshape(v, (W, 2, 2, 2)))
        ve0, ve1 = tl.split(ve)
        vo0, vo1 = tl.split(vo)
        x0, x4 = tl.split(ve0)
        x2, x6 = tl.split(ve1)
        x1, x5 = tl.split(vo0)
        x3, x7 = tl.split(vo1)
        p = ((o0 * x0[None, :] + o4 * x4[None, :]) + (o1 * x1[None, :] + o5 * x5[None, :])) + \
            ((o2 * x2[None, :] + o6 * x6[None, :]) + (o3 * x3[None, :] + o7 * x7[None, :]))  # (R, W) fp16
        pg = tl.sum(tl.reshape(p.to(tl.float32), (R, NG, 4)), axis=2)  # (R, NG)
        sc = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)
        acc += pg * sc
        wd, s, v = wd_n, s_n, v_n
    return tl.sum(acc, axis=1)


@triton.jit(do_not_specialize=["M", "tune_m"])
def _g16_mlp1_kernel(x16_ptr, xf_ptr, ids_ptr, w_ptr, s_ptr, b_ptr, act_ptr, M, limit, act_mul, tune_m,
                     H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K_ROUTE: tl.constexpr, EP: tl.constexpr,
                     BU: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr):
    j = tl.program_id(0)
    e = _slot_expert(ids_ptr, tl.program_id(1), M, EP, CH)
    if e >= E:
        return
    R: tl.constexpr = 2 * BU
    local = j * R + tl.arange(0, R)
    rmask = local < 2 * I
    rows = e.to(tl.int64) * (2 * I) + local
    bias = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    units = j * BU + tl.arange(0, BU)
    for p in range(0, M):
        if tl.load(ids_ptr + p).to(tl.int32) == e:
            tok = p // K_ROUTE
            h = _g16_rows(w_ptr, s_ptr, rows, rmask, x16_ptr + tok * H, H, BK) * tl.load(xf_ptr + tok) + bias
            glu, lin = tl.split(tl.reshape(h, (BU, 2)))
            out = _swiglu(glu, lin, limit) * act_mul
            tl.store(act_ptr + p * I + units, out.to(tl.float16), mask=units < I)


@triton.jit(do_not_specialize=["M", "tune_m"])
def _g16_mlp2_kernel(act_ptr, ids_ptr, w_ptr, s_ptr, y_ptr, M, act_inv, tune_m,
                     H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                     BH: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr):
    j = tl.program_id(0)
    e = _slot_expert(ids_ptr, tl.program_id(1), M, EP, CH)
    if e >= E:
        return
    hs = j * BH + tl.arange(0, BH)
    hmask = hs < H
    rows = e.to(tl.int64) * H + hs
    for p in range(0, M):
        if tl.load(ids_ptr + p).to(tl.int32) == e:
            y = _g16_rows(w_ptr, s_ptr, rows, hmask, act_ptr + p * I, I, BK) * act_inv
            tl.store(y_ptr + p * H + hs, y, mask=hmask)


def _g16_configs(first: str, pairs: bool) -> list:
    out = []
    for rows, bk, warps in [(32, 256, 4), (32, 512, 4), (64, 256, 4), (64, 512, 8), (16, 512, 4)]:
        out.append(triton.Config({first: rows // 2 if pairs else rows, "BK": bk}, num_warps=warps, num_stages=1))
    return out


def moe_gemv16(x, weights, expert_ids, b1, s1, bias1, b2, s2, bias2, swiglu_limit, *, config=None):
    """CUDA-core GEMV with fp16 products (variant gemv16). config: fixed {"BU","BH","BK","num_warps"}."""
    N, H, E, I, K = _check_inputs(x, expert_ids, b1, s1, b2, s2)
    M = N * K
    dev = x.device
    ids = expert_ids.reshape(-1)
    rw = weights.reshape(-1)
    x = x.contiguous()
    limit = float(swiglu_limit)
    bound = max(limit * (limit + 1.0), 1.0)  # |SwiGLU output| bound
    act_shift = max(0, min(14, int(torch.tensor(60000.0 / bound).log2().floor().item())))
    x16 = torch.empty((N, H), dtype=torch.float16, device=dev)
    xf = torch.empty((N,), dtype=torch.float32, device=dev)
    _x16_prep_kernel[(N,)](x, x16, xf, H=H, BH=_next_pow2(H), num_warps=4)
    act = torch.empty((M, I), dtype=torch.float16, device=dev)
    y = torch.empty((M, H), dtype=torch.float32, device=dev)
    slots = min(M, E)
    EP = _next_pow2(E)
    tune_m = _next_pow2(M)
    if config is None and not INTERP:
        k1, k2 = _tuned("g16_1"), _tuned("g16_2")
        c1 = c2 = {}
    else:
        c = {"BU": 16, "BH": 32, "BK": 64, "num_warps": 4, **(config or {})}
        k1, k2 = _g16_mlp1_kernel, _g16_mlp2_kernel
        c1 = {"BU": c["BU"], "BK": c["BK"], "num_warps": c["num_warps"], "num_stages": 1}
        c2 = {"BH": c["BH"], "BK": c["BK"], "num_warps": c["num_warps"], "num_stages": 1}
    k1[lambda m: (triton.cdiv(I, m["BU"]), slots)](
        x16, xf, ids, b1.view(torch.int32), s1, bias1, act, M, limit, float(2.0 ** act_shift), tune_m,
        H=H, I=I, E=E, K_ROUTE=K, EP=EP, CH=CH, **c1)
    k2[lambda m: (triton.cdiv(H, m["BH"]), slots)](
        act, ids, b2.view(torch.int32), s2, y, M, float(2.0 ** (14 - act_shift)), tune_m,
        H=H, I=I, E=E, EP=EP, CH=CH, **c2)
    return _combine(y, ids, rw, bias2, torch.empty_like(x), N, H, K)


# ----------------------------------------------------------------------------------------------------------------
# Data, reference, checks
# ----------------------------------------------------------------------------------------------------------------
def make_layer(E, H, I, device, gen, scale_lo=118, scale_hi=125):
    m1, m2 = MXFP4Experts(E, 2 * I, H, device=device), MXFP4Experts(E, H, I, device=device)
    for st in (m1, m2):
        st.blocks.copy_(torch.randint(0, 256, st.blocks.shape, dtype=torch.uint8, generator=gen).to(device))
        st.scales.copy_(torch.randint(scale_lo, scale_hi, st.scales.shape, dtype=torch.uint8, generator=gen).to(device))
    b1 = (torch.randn(E, 2 * I, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    b2 = (torch.randn(E, H, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    return m1, b1, m2, b2


def make_tokens(N, E, H, K, device, gen, skew=False):
    x = torch.randn(N, H, generator=gen).to(torch.bfloat16).to(device)
    logits = torch.randn(N, E, generator=gen)
    if skew:  # most tokens pick expert 0 and 1: several token tiles per expert
        logits[:, 0] += 10.0
        logits[:, 1] += 8.0
    w, ids = route(logits.to(device), K)
    return x, w.to(torch.bfloat16), ids


def reference_f32(x, w, ids, layer, limit=7.0):
    """gptoss.kernels.moe.moe in float32 over the exactly dequantized experts."""
    m1, b1, m2, b2 = layer
    return moe(x.float(), w.float(), ids, m1, b1.float(), m2, b2.float(), limit)


def errors(out, ref):
    """(||out - ref|| / ||ref||, max |out - ref| / max |ref|)"""
    d = out.float() - ref.float()
    return (d.norm() / ref.norm()).item(), (d.abs().max() / ref.abs().max()).item()


def call_variant(name, x, w, ids, layer, **kw):
    m1, b1, m2, b2 = layer
    args = (x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0)
    if name == "tc_f16":
        return moe_tc(*args, f16=True, **kw)
    if name == "tc_bf16":
        return moe_tc(*args, f16=False, **kw)
    if name == "gemv16":
        return moe_gemv16(*args, **kw)
    from gptoss.kernels import moe_triton as mt
    if name == "base":
        return mt.moe_triton(*args, **kw)
    if name == "base_gemm":
        return mt.moe_triton(*args, path="gemm", **kw)
    if name == "base_gemv":
        return mt.moe_triton(*args, path="gemv", **kw)
    raise ValueError(name)


def interpret_check():
    """Tiny shapes on the CPU under TRITON_INTERPRET=1: every variant against the fp32 reference.

    Main check with fp32 x (values bf16-representable), so the output is not rounded to bf16 and the error is the
    kernels' own (tolerance 1e-3; 1e-2 for tc_bf16, whose activations are rounded to bf16 by design). A second pass
    with bf16 x only reports errors: the interpreter casts fp32 -> bf16 by truncation, so even the baseline shows
    ~2 bf16 half-ulps (3-5e-3) there, unlike the GPU (round to nearest)."""
    assert INTERP, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    cases = [  # (E, H, I, K, N, skew, configs, scale range)
        (4, 64, 64, 2, 1, False, [{}], (118, 125)),
        (4, 64, 64, 2, 3, False, [{"BT": 8}], (118, 125)),
        (4, 96, 96, 2, 5, False, [{"BK": 64, "BU": 32, "BH": 64}, {"BK": 32, "PREFETCH": False}], (118, 125)),
        (4, 64, 64, 2, 20, True, [{"BT": 8}], (118, 125)),  # > BT pairs on one expert: several token tiles
        (4, 128, 64, 2, 4, False, [{"BK": 128}], (100, 140)),  # wide scale range: row-relative fp16 scaling
        (8, 64, 96, 4, 6, False, [{"BT": 16, "BK": 32}], (110, 130)),
    ]
    tol = {"tc_f16": 1e-3, "tc_bf16": 1e-2, "gemv16": 1e-3, "base": 1e-3}
    worst, worst_bf16 = {}, {}
    for E, H, I, K, N, skew, cfgs, (slo, shi) in cases:
        layer = make_layer(E, H, I, "cpu", gen, slo, shi)
        x, w, ids = make_tokens(N, E, H, K, "cpu", gen, skew=skew)
        ref = reference_f32(x, w, ids, layer)
        counts = torch.bincount(ids.reshape(-1), minlength=E).tolist()
        log(f"E={E} H={H} I={I} K={K} N={N} scales {slo}..{shi - 1} pairs per expert {counts}")
        for variant in ("tc_f16", "tc_bf16", "gemv16", "base"):
            for cfg in (cfgs if variant.startswith("tc") else [{}]):
                if variant == "gemv16":
                    kw = {"config": {"BU": 16, "BH": 32, "BK": 64 if H % 64 == 0 and I % 64 == 0 else 32}}
                elif variant == "base":
                    kw = {}
                else:
                    kw = {"config": cfg}
                t0 = time.time()
                try:
                    out = call_variant(variant, x.float(), w, ids, layer, **kw)
                    rel, mx = errors(out, ref)
                    ok = bool(torch.isfinite(out).all().item()) and rel <= tol[variant]
                    worst[variant] = max(worst.get(variant, 0.0), rel if ok else float("inf"))
                    out16 = call_variant(variant, x, w, ids, layer, **kw)
                    rel16, _ = errors(out16, ref)
                    worst_bf16[variant] = max(worst_bf16.get(variant, 0.0), rel16)
                    log(f"  {variant:8s} {str(cfg):42s} fp32 x: rel={rel:.2e} max={mx:.2e} {'ok' if ok else 'FAIL'}"
                        f" | bf16 x: rel={rel16:.2e} ({time.time() - t0:.1f} s)")
                except Exception:
                    log(f"  {variant} {cfg} EXCEPTION")
                    traceback.print_exc(file=sys.stdout)
                    worst[variant] = float("inf")
    log("worst relative error, fp32 x: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    log("worst relative error, bf16 x (interpreter truncates to bf16): " +
        ", ".join(f"{k} {v:.2e}" for k, v in worst_bf16.items()))
    bad = [k for k, v in worst.items() if not v <= tol[k]]
    log("INTERPRETER CHECK " + ("PASSED" if not bad else f"FAILED: {bad}"))
    return 0 if not bad else 1


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark
# ----------------------------------------------------------------------------------------------------------------
def expert_bytes(ids, H, I):
    u = torch.unique(ids).numel()
    per = (2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 2) + (H * I // 2 + H * I // 32 + H * 2)
    return u, u * per


def tuning_rows(name):
    k = _TUNED.get(name)
    timings = getattr(k, "configs_timings", None) or {}
    rows = []
    for cfg, t in timings.items():
        t = t[0] if isinstance(t, (list, tuple)) else t
        rows.append((float(t), f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"))
    return sorted(rows)


def graph_time_us(calls, reps_per_graph=2, samples=25):
    """One CUDA graph holding `calls` (one per layer) reps_per_graph times; median over samples of the per-call time
    (CUDA events around 4 back-to-back replays)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps_per_graph):
            for c in calls:
                c()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    per_sample = 4
    times = []
    for _ in range(samples):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(per_sample):
            g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (per_sample * reps_per_graph * len(calls)))
    times.sort()
    del g
    return times[len(times) // 2]


_WARM: dict = {}


def _compile_one(task):
    """(variant, N, config): one fixed-config call on the real shapes: fills triton's on-disk cache with the kernel
    the autotuner compiles for the same candidate."""
    variant, N, cfg = task
    try:
        if "layer" not in _WARM:
            _WARM["layer"] = make_layer(32, 2880, 2880, "cuda", torch.Generator().manual_seed(5))
        x, w, ids = make_tokens(N, 32, 2880, 4, "cuda", torch.Generator().manual_seed(6))
        call_variant(variant, x, w, ids, _WARM["layer"], config=cfg)
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return f"{variant} N={N} {cfg}: {type(exc).__name__} {str(exc)[:160]}"


def precompile(procs, variants):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    tasks = []
    if any(v.startswith("tc") for v in variants):
        for c1, c2 in zip(TC1_CONFIGS, TC2_CONFIGS):
            for c in (c1, c2):  # a fixed config runs both kernels: compile each candidate of each kernel
                bu_or_bh, bk, bt, pf, wps, st = c
                cfg = {"BU": bu_or_bh if c is c1 else 16, "BH": bu_or_bh if c is c2 else 32, "BK": bk, "BT": bt,
                       "PREFETCH": bool(pf), "num_warps": wps, "num_stages": st}
                for v in ("tc_f16", "tc_bf16"):
                    if v in variants:
                        tasks.append((v, 1, cfg))
    if "gemv16" in variants:
        for c in _g16_configs("BH", False):
            tasks.append(("gemv16", 1, {"BU": c.kwargs["BH"] // 2, "BH": c.kwargs["BH"], "BK": c.kwargs["BK"],
                                        "num_warps": c.num_warps}))
    try:
        from gptoss.kernels import moe_triton as mt
        if "base" in variants:
            for N in (1, 16):  # M = 4 and 64: the two integer specializations of the GEMV kernels' M argument
                for c in mt._gemv_configs("BLOCK_H", False):
                    tasks.append(("base_gemv", N, dict(c.kwargs, BLOCK_U=c.kwargs["BLOCK_H"] // 2,
                                                       num_warps=c.num_warps)))
            for c in mt._dot_configs(True) + mt._dot_configs(False):
                tasks.append(("base_gemm", 64, dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)))
    except Exception:
        traceback.print_exc(file=sys.stdout)
    t0 = time.time()
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        for r in ex.map(_compile_one, tasks):
            if r:
                log(f"precompile: {r}")
    log(f"precompiled {len(tasks)} candidate launches with {procs} processes in {time.time() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--interpret-check", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ns", default="1,4,16,64")
    ap.add_argument("--variants", default="base,tc_f16,tc_bf16,base_gemm",
                    help="comma list of base, base_gemm, base_gemv, tc_f16, tc_bf16, gemv16")
    ap.add_argument("--precompile", type=int, default=12, metavar="PROCS", help="0 to skip")
    ap.add_argument("--skew", action="store_true", help="skewed routing (few hot experts)")
    args = ap.parse_args()
    if args.interpret_check:
        sys.exit(interpret_check())
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: use TRITON_INTERPRET=1 ... --interpret-check")
    t_start = time.time()
    from gptoss.kernels import moe_triton as mt

    variants = [v for v in args.variants.split(",") if v]
    Ns = [int(n) for n in args.ns.split(",")]
    E, H, I, K = 32, 2880, 2880, 4
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.precompile:
        precompile(args.precompile, variants)

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    log(f"copy 256 MiB: {2 * a.numel() * 10 / (s.elapsed_time(e) * 1e-3) / 1e9:.0f} GB/s (read + write)")
    del a, b

    gen = torch.Generator().manual_seed(0)
    layers = [make_layer(E, H, I, "cuda", gen) for _ in range(args.layers)]
    sc_all = torch.cat([torch.stack([l[0].scales.min(), l[0].scales.max(), l[2].scales.min(), l[2].scales.max()])
                        for l in layers])
    log(f"{args.layers} layers of random experts (scales {sc_all.min().item()}..{sc_all.max().item()}), "
        f"{time.time() - t_start:.0f} s so far")
    summary = []
    for N in Ns:
        toks = [make_tokens(N, E, H, K, "cuda", gen, skew=args.skew) for _ in layers]
        nb = [expert_bytes(ids, H, I) for (_, _, ids) in toks]
        avg_u = sum(u for u, _ in nb) / len(nb)
        avg_bytes = sum(bb for _, bb in nb) / len(nb)
        x0, w0, ids0 = toks[0]
        ref = reference_f32(x0, w0, ids0, layers[0])
        log(f"\n=== N={N}: {avg_u:.1f} distinct experts, {avg_bytes / 1e6:.1f} MB per layer call ===")
        for v in variants:
            if v in ("gemv16", "base_gemv") and N > 16:
                continue
            if v == "base_gemm" and N > mt.DECODE_MAX_TOKENS and "base" in variants:
                continue  # identical to base there
            try:
                t0 = time.time()
                out = call_variant(v, x0, w0, ids0, layers[0])  # first call: compile / autotune
                torch.cuda.synchronize()
                t_first = time.time() - t0
                rel, mx = errors(out, ref)
                calls = [(lambda li=li: call_variant(v, *toks[li], layers[li])) for li in range(len(layers))]
                us = graph_time_us(calls)
                gbs = avg_bytes / (us * 1e-6) / 1e9
                line = f"{v:10s} N={N:3d}  {us:8.1f} us/layer  {gbs:6.0f} GB/s  rel={rel:.2e} max={mx:.2e}"
                log(line + f"   (first call {t_first:.1f} s)")
                summary.append(line)
                for name in {"tc_f16": ("tc1", "tc2"), "tc_bf16": ("tc1", "tc2"), "gemv16": ("g16_1", "g16_2")}.get(
                        v, ()):
                    rows = tuning_rows(name)
                    if rows:
                        log(f"    autotune {name}: " + " | ".join(f"{t * 1e3:.1f} us {c}" for t, c in rows[:3]))
            except Exception:
                log(f"{v} N={N} FAILED")
                traceback.print_exc(file=sys.stdout)
                summary.append(f"{v:10s} N={N:3d}  FAILED")
        log(f"({time.time() - t_start:.0f} s so far)")
    log("\n==== summary: per layer call (CUDA graph replay), GB/s over the distinct experts' bytes, errors vs fp32 ====")
    for line in summary:
        log(line)
    log(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
