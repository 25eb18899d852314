"""Triton MoE over packed MXFP4 experts: a drop-in for `gptoss.kernels.moe.moe` that never materializes bf16 experts.

Shapes: N tokens, H hidden, I per-expert intermediate, E experts, K experts per token, M = N * K (token, expert)
pairs. Inputs exactly as the model stores them:
  x            (N, H)          bf16 (or fp16 / fp32)
  weights      (N, K)          routing weights from `route()`
  expert_ids   (N, K)          int expert ids from `route()` (distinct within a token, as top-k gives)
  mlp1_blocks  (E, 2I, H/32, 16) uint8, mlp1_scales (E, 2I, H/32) uint8, mlp1_bias (E, 2I)
  mlp2_blocks  (E, H, I/32, 16)  uint8, mlp2_scales (E, H, I/32) uint8, mlp2_bias (E, H)
MXFP4: value = FP4[code] * 2^(scale - 127); the low nibble of byte b is element 2b, the high nibble 2b+1.
mlp1's rows interleave SwiGLU: row 2j is gate unit j, row 2j+1 its linear part.

Pipeline:
  kernel A: act[m] = SwiGLU(x[token(m)] @ W1[e(m)]^T + b1[e(m)])    act (M, I): fp32 (GEMV), x's dtype (GEMM)
  kernel B: y[pair(m)] = act[m] @ W2[e(m)]^T + b2[e(m)]              y (M, H) in x's dtype, by pair (token * K + k)
  combine:  out[n] = sum_k w(n, k) * y[n * K + k] (+ residual[n])   float32 sum in a fixed order: deterministic
Rounding follows the pure path: each expert's output is rounded to x's dtype (as its F.linear returns it), the
weighted sum is float32, rounded once, then the residual is added. Weights are read as packed bytes (or int32
words) and decoded in registers from their bits (no lookup table); products and sums are fp32.

Two kernel families here, and the tensor-core grouped GEMM of `gptoss.kernels.moe_mma` (Gluon), which serves
2-512 tokens where it can (see MMA_MIN_TOKENS below for the measured choice):
  * decode (one token; up to DECODE_MAX_TOKENS where moe_mma does not serve): GEMV on CUDA cores, 3 launches (A, B,
    combine; x in fp32, which the model's fused norm writes), no sort.
    Grid (pair i, block of output rows); program (i, j) runs only if pair i is the first pair routed to its
    expert, and then serves every pair of that expert, so each selected expert's packed bytes are read from
    HBM once. Row-contiguous word tiles (coalesced), FP4 codes -> fp16 through e4m3 conversions on sm_89 and
    later (_fp4_octet_e4m3; the 20b decode step 2.089 -> 2.016 ms on H100), else two codes -> an fp16 pair
    with ~5 integer ops (_fp4_pair16); the next step's loads issued before the current step's decode. Measured
    on H100 (N=1, 20b shapes, 52.9 MB of experts): A + B 34 us of kernels (mlp1 22, mlp2 12), ~1.5 TB/s; every
    tile candidate lands within 10% of that, and a tensor-core variant (FP4 -> fp16 in ~2 ops, tl.dot against
    16-token tiles; an experiment kept in git history, commit 6eb6bba, scripts/moe_variants.py) took 58 us at N=1
    but beat this GEMV at N=16 (305 vs 463 us) and the GEMM at N=64 (411 vs 462 us).
    A split-K form (one K chunk per program, partials reduced by the last program) was slower: 44 us of A + B
    at N=1 and 1.3-1.4x slower at N=4 / 8.
  * prefill: pairs grouped by expert (`group_pairs`: one small kernel, two above GROUP_ONEHOT / experts pairs),
    grouped GEMM with tl.dot over (BM rows of one expert) x (BN outputs) tiles. Each program finds its tile
    in-kernel from the per-expert row ends, so BM is autotuned with BN / BK / warps / stages (key: shapes, E and M's
    power-of-two bucket). Grid (column block, tile) with column blocks fastest: the programs in flight share the
    gathered activation tile through L2. Plain tl.dot (wgmma on Hopper, mma on Ampere) on tiles dequantized
    here; SWAP computes W @ x^T so the dequantized weight tile is the MMA's register operand (mlp1's pick).
    With bf16 activations the autotuner also tries SCALED tiles, where tl.dot_scaled takes the packed bytes and
    scales as stored and Triton decodes them in the MMA's operand layout: the same numbers bit for bit, and on
    H100 at 64 tokens (batched decode) 388 us a call against 458 (scripts/moe_dot_scaled.py, in git history at
    commit df021db), on a par at 1024. Measured on H100 (20b shapes): N=1024 1.04 ms of kernels per layer call
    (195 TFLOP/s; 1.30 ms eager), N=8192 5.56 ms (293 TFLOP/s). For long prefills on Hopper, where every
    expert holds hundreds of rows, `gptoss.kernels.moe_dense` (the experts dequantized to bf16 one layer at a
    time, then torch's grouped GEMM) runs instead: 4.72 ms at N=8192 on an H100.
Neither path synchronizes with the host: calls can be captured in a CUDA graph (after a first, autotuning call).

Run on CPU for debugging with TRITON_INTERPRET=1 (tiny shapes; CPU tensors). Triton 3.6's interpreter needs
numpy < 2.3 for these kernels (loops bounded by a runtime argument fail on numpy 2.4).
"""

from __future__ import annotations

import os
import weakref

import torch

from gptoss.kernels import arch_switch, cuda_arch, triton_interpreting

try:  # triton is optional (the `gpu` extra); the reference path never needs it
    import triton
    import triton.language as tl

    from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel
    from gptoss.kernels.rounding import round_to

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    triton = None
    tl = None
    HAS_TRITON = False

SWIGLU_ALPHA = 1.702
# Which kernels path "auto" runs for N tokens, from scripts/moe_crossover.py (H200, 20b shapes, graphed, us a layer
# call; GEMV / this module's GEMM / the tensor-core GEMM of gptoss.kernels.moe_mma):
#   N=1 36.9 / 79.4 / 59.4, N=2 77.0 / 102.9 / 71.4, N=8 237.1 / 190.7 / 155.4, N=64 - / 291.0 / 243.0,
#   N=256 - / 536.0 / 466.3, N=512 - / 651.7 / 726.2, N=1024 - / 1010.1 / 1276.2;
# with moe_mma's activations staged in shared memory (H200, a later session, the best of the fixed tiles tried):
#   N=64 201.2 vs 259.9, N=256 361.8 vs 438.6, N=512 609.7 vs 653.9, N=1024 1032.4 vs 1017.2 (this module's GEMM,
#   autotuned).
# Above MMA_MAX_TOKENS on an H100 (this session's moe_wgmma: packed words staged in shared memory), us:
#   tokens  Triton GEMM  moe_mma  moe_wgmma  moe_dense
#      768        754.7    818.0      619.3     1502.9
#     1024        982.3   1000.9      875.9     1737.4
#     2048       1761.9   1723.5     1561.7     1838.0
#     3072       2317.8   2498.9     2388.9     2247.9
#     4096       2948.4   3233.2     3121.8     2581.5
# So: the GEMV at one token; the tensor-core GEMM from MMA_MIN_TOKENS to MMA_MAX_TOKENS where it serves (bf16
# activations, Gluon, sm_80+), the GEMV up to DECODE_MAX_TOKENS where it does not; above, on Hopper, the
# dequantizing grouped GEMM of gptoss.kernels.moe_dense for long prefills (MIN_ROWS_PER_EXPERT there) and
# gptoss.kernels.moe_wgmma below that; this module's GEMM elsewhere.
MMA_MIN_TOKENS = 2
MMA_MAX_TOKENS = 512
# The GEMV against this module's GEMM (H100, with the GEMM's dot_scaled tiles): 185 vs 186 us at 6 tokens, 238 vs
# 243 at 8, 350 vs 307 at 12.
DECODE_MAX_TOKENS = 8


def gemv_serves(num_tokens: int) -> bool:
    """Whether moe_triton's automatic choice runs the GEMV kernels (which read x in float32) for this many tokens
    on a GPU where the tensor-core GEMM serves (elsewhere it also runs them up to DECODE_MAX_TOKENS)."""
    return num_tokens < MMA_MIN_TOKENS


def moe_fast_available(x: torch.Tensor) -> bool:
    """True when moe_triton can run on x: triton importable, CUDA tensor of a float dtype, kernels not forced
    to the reference (GPTOSS_KERNELS=reference)."""
    from gptoss.kernels import use_reference

    return (
        HAS_TRITON
        and not use_reference()
        and x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


if HAS_TRITON:

    # ------------------------------------------------------------------------------------------------------
    # MXFP4 dequantization in registers. FP4 values are built from bits (no lookup table); the E8M0 block
    # scale 2^(s - 127) is the float with exponent field s, applied per 32-element group.
    # ------------------------------------------------------------------------------------------------------
    @triton.jit
    def _fp4_code_value(c):
        """c: uint32 codes 0..15 -> FP4 value (float32), branch-free 'safe' form (no subnormals involved)."""
        em = c & 7
        bits = tl.where(em >= 2, (em << 22) + 0x3F000000, em * 0x3F000000)  # 0x3F000000 = 0.5
        return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp4_unscaled(packed, DENORM: tl.constexpr):
        """packed: uint8 bytes (any shape) -> (low, high) float32 FP4 values, block scale not applied:
        element 2b is the low nibble of byte b, element 2b+1 the high nibble.

        DENORM: code (s, e1 e0, m) placed as fp32 bits s | exponent field e | mantissa top bit m is the value
        times 2^-126 (code 1 = 0.5 lands on the subnormal 2^-127), so one multiply by 2^126 finishes it:
        3 integer ops + 1 multiply per element. Needs fp32 subnormals kept (plain fp32 multiplies on NVIDIA GPUs
        keep them; tests check every byte). Otherwise the 'safe' compare/select form is used."""
        p = packed.to(tl.uint32)
        if DENORM:
            lo = ((p << 22) & 0x01C00000) | ((p << 28) & 0x80000000)
            hi = ((p << 18) & 0x01C00000) | ((p << 24) & 0x80000000)
            two126 = 8.507059173023462e37
            return lo.to(tl.float32, bitcast=True) * two126, hi.to(tl.float32, bitcast=True) * two126
        else:
            return _fp4_code_value(p & 15), _fp4_code_value(p >> 4)

    @triton.jit
    def _scale_value(s):
        """uint8 E8M0 scale bytes -> 2^(s - 127) as float32 (s = 0 gives 0 instead of 2^-127)."""
        return (s.to(tl.uint32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _swiglu(h_glu, h_lin, limit, DT: tl.constexpr):
        """Clamped SwiGLU of float32 mlp1 outputs, rounded as the pure path's torch ops on DT tensors round:
        h (F.linear's output), 1.702 * glu, its sigmoid, glu * sigmoid, lin + 1 and the product each to DT.
        Returns float32 values that DT holds exactly."""
        glu = tl.minimum(round_to(h_glu, DT), limit)
        lin = tl.minimum(tl.maximum(round_to(h_lin, DT), -limit), limit)
        gated = round_to(glu * round_to(tl.sigmoid(round_to(1.702 * glu, DT)), DT), DT)
        return round_to(gated * round_to(lin + 1.0, DT), DT)

    # ------------------------------------------------------------------------------------------------------
    # Decode: GEMV. Grid (M pairs, row blocks). Program (i, j) works only if pair i is the first pair of its
    # expert ("leader"); it then streams rows block j of that expert's packed matrix once per pair of the expert
    # (count <= T, usually 1; repeats hit L1/L2), dequantizing in registers.
    # ------------------------------------------------------------------------------------------------------
    @triton.jit
    def _fp4_pair16(wd, K: tl.constexpr):
        """wd: uint32 words (8 FP4 codes: inputs 8q .. 8q+7) -> float32 values of inputs 8q+K and 8q+4+K,
        without the block scale and times 2^-14: t = wd >> 4K brings both codes to bits 0..3 and 16..19, and
        ((t << 9) & 0x0E000E00) | ((t << 12) & 0x80008000) is the fp16 pair (exponent field e, mantissa top bit
        m, sign); code 1 (0.5) becomes the fp16 subnormal 2^-15, which fp16 -> fp32 keeps exactly."""
        t = wd >> (4 * K)
        v = ((t << 9) & 0x0E000E00) | ((t << 12) & 0x80008000)
        lo = v.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi

    # FP4 codes -> e4m3 bytes -> fp16 (`cvt.rn.f16x2.e4m3x2`, sm_89+) -> fp32, 8 codes of one word at a time. A code
    # (s, e1 e0, m) placed as e4m3 bits s | 00 e1 e0 | m 0 0 is the FP4 value times 2^-6 (code 1, 0.5, lands on the
    # e4m3 subnormal 2^-7), exact in fp16 and fp32. Outputs: inputs 0, 2, 4, 6 (low nibbles), then 1, 3, 5, 7.
    _FP4_E4M3_OCTET = tl.constexpr("""
    {
    .reg .b32 a, b, e, o;
    .reg .b16 e01, e23, o01, o23, x0, x1, x2, x3, x4, x5, x6, x7;
    .reg .b32 h0, h1, h2, h3;
    shl.b32 a, $8, 2;
    shl.b32 b, $8, 4;
    and.b32 a, a, 0x1C1C1C1C;
    and.b32 b, b, 0x80808080;
    or.b32 e, a, b;
    shr.b32 a, $8, 2;
    and.b32 a, a, 0x1C1C1C1C;
    and.b32 b, $8, 0x80808080;
    or.b32 o, a, b;
    mov.b32 {e01, e23}, e;
    mov.b32 {o01, o23}, o;
    cvt.rn.f16x2.e4m3x2 h0, e01;
    cvt.rn.f16x2.e4m3x2 h1, e23;
    cvt.rn.f16x2.e4m3x2 h2, o01;
    cvt.rn.f16x2.e4m3x2 h3, o23;
    mov.b32 {x0, x1}, h0;
    mov.b32 {x2, x3}, h1;
    mov.b32 {x4, x5}, h2;
    mov.b32 {x6, x7}, h3;
    cvt.f32.f16 $0, x0;
    cvt.f32.f16 $1, x1;
    cvt.f32.f16 $2, x2;
    cvt.f32.f16 $3, x3;
    cvt.f32.f16 $4, x4;
    cvt.f32.f16 $5, x5;
    cvt.f32.f16 $6, x6;
    cvt.f32.f16 $7, x7;
    }
    """)

    @triton.jit
    def _fp4_octet_e4m3(wd):
        """wd: int32 words (8 FP4 codes: inputs 8q .. 8q+7) -> float32 values of inputs 8q + (0, 2, 4, 6, 1, 3, 5,
        7), times 2^-6, block scale not applied (`_FP4_E4M3_OCTET`)."""
        return tl.inline_asm_elementwise(_FP4_E4M3_OCTET, "=r,=r,=r,=r,=r,=r,=r,=r,r", [wd],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _load_step(w_ptr, s_ptr, v_ptr, rows, rmask, k0, KDIM: tl.constexpr, BLOCK_K: tl.constexpr):
        """Row-contiguous int32 words (R, BLOCK_K/8) (lanes read consecutive 16-byte pieces of a row), scales
        (R, NG) and activations (NG, 32) of inputs k0 .. k0+BLOCK_K-1 (masked past KDIM, so a step beyond the end
        touches no memory). w_ptr: int32 view of the blocks, word q of a row = inputs 8q .. 8q+7."""
        KW: tl.constexpr = KDIM // 8
        G: tl.constexpr = KDIM // 32
        NG: tl.constexpr = BLOCK_K // 32
        w_idx = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        g = k0 // 32 + tl.arange(0, NG)
        gm = g < G
        wd = tl.load(w_ptr + rows[:, None] * KW + w_idx[None, :], mask=rmask[:, None] & (w_idx < KW)[None, :],
                     other=0).to(tl.uint32, bitcast=True)
        s = tl.load(s_ptr + rows[:, None] * G + g[None, :], mask=rmask[:, None] & gm[None, :], other=0)
        v = tl.load(v_ptr + g[:, None] * 32 + tl.arange(0, 32)[None, :], mask=gm[:, None], other=0.0)
        return wd, s, v.to(tl.float32)

    @triton.jit
    def _gemv_rows(w_ptr, s_ptr, rows, rmask, v_ptr, KDIM: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP8_CVT: tl.constexpr):
        """sum_k W[rows, k] * v[k] over rows (R,) int64 of a (rows, KDIM) MXFP4 matrix -> (R,) float32.
        FP8_CVT: 8 codes a word through e4m3 conversions (_fp4_octet_e4m3, sm_89+); else two codes per 32-bit op
        (_fp4_pair16, ~5 SASS instructions per weight on sm_90). The next step's loads are issued before this
        step's decode (registers double-buffered): a program makes only a few steps, so without this each step
        waits a full memory latency."""
        NG: tl.constexpr = BLOCK_K // 32
        R: tl.constexpr = rows.shape[0]
        acc = tl.zeros((R, NG), dtype=tl.float32)
        wd, s, v = _load_step(w_ptr, s_ptr, v_ptr, rows, rmask, 0, KDIM, BLOCK_K)
        for k0 in range(0, KDIM, BLOCK_K):
            wd_n, s_n, v_n = _load_step(w_ptr, s_ptr, v_ptr, rows, rmask, k0 + BLOCK_K, KDIM, BLOCK_K)
            if FP8_CVT:
                o0, o2, o4, o6, o1, o3, o5, o7 = _fp4_octet_e4m3(wd.to(tl.int32, bitcast=True))
                sc = ((s.to(tl.uint32) + 6) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127) * 2^6
            else:
                o0, o4 = _fp4_pair16(wd, 0)
                o1, o5 = _fp4_pair16(wd, 1)
                o2, o6 = _fp4_pair16(wd, 2)
                o3, o7 = _fp4_pair16(wd, 3)
                sc = ((s.to(tl.uint32) + 14) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127) * 2^14
            # nested joins whose row-major flattening is o0 .. o7: (R, words, 2, 2, 2) -> (R, NG, 32)
            w = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
            w = tl.reshape(w, (R, NG, 32))
            acc += tl.sum(w * v[None, :, :], axis=2) * sc
            wd, s, v = wd_n, s_n, v_n
        return tl.sum(acc, axis=1)

    @triton.jit
    def _first_of_expert(ids_ptr, i, M, E, MP: tl.constexpr, SHARD: tl.constexpr):
        """(whether pair i's programs skip: it is NOT the first pair routed to its expert, or, in an expert shard's
        call, its expert is another rank's (id E); that expert). ids: (M,) flat expert ids."""
        e = tl.load(ids_ptr + i)
        j = tl.arange(0, MP)
        ids = tl.load(ids_ptr + j, mask=j < M, other=-1)
        skip = tl.sum(((ids == e) & (j < i)).to(tl.int32), axis=0) > 0
        if SHARD:
            skip = skip | (e >= E)
        return skip, e

    @triton.jit
    def _mlp1_swiglu_gemv_kernel(
        x_ptr,  # (N, H) float32 activations
        ids_ptr,  # (M,) expert id of each pair (token * K + k), any int dtype
        w_ptr,  # (E, 2I, H/32, 4) int32 view of the packed blocks
        s_ptr,  # (E, 2I, H/32) uint8
        b_ptr,  # (E, 2I)
        act_ptr,  # (M, I) out, by pair
        M,
        E,  # experts held
        limit,
        H: tl.constexpr,
        I: tl.constexpr,
        K_ROUTE: tl.constexpr,
        ACT_DTYPE: tl.constexpr,  # the model's activation dtype (x arrives in float32): SwiGLU rounds through it
        MP: tl.constexpr,  # power of two >= M
        BLOCK_U: tl.constexpr,  # SwiGLU units per program = 2 * BLOCK_U interleaved weight rows
        BLOCK_K: tl.constexpr,  # inputs per step (multiple of 32)
        PDL: tl.constexpr,  # launched with programmatic dependent launch (gptoss.kernels.pdl)
        FP8_CVT: tl.constexpr,  # FP4 decoded through e4m3 (`_fp4_octet_e4m3`, sm_89+)
        SHARD: tl.constexpr,  # an expert shard's call: pairs of expert id E are other ranks' (skipped)
    ):
        i = tl.program_id(0)
        j = tl.program_id(1)
        wait_for_prior_kernel(PDL)
        skip, e = _first_of_expert(ids_ptr, i, M, E, MP, SHARD)
        if skip:
            return
        R: tl.constexpr = 2 * BLOCK_U
        local = j * R + tl.arange(0, R)  # rows within the expert: 2u gate, 2u+1 linear
        rmask = local < 2 * I
        rows = e.to(tl.int64) * (2 * I) + local
        bias = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        units = j * BLOCK_U + tl.arange(0, BLOCK_U)
        for p in range(i, M):  # every pair routed to expert e (the first is i)
            if tl.load(ids_ptr + p) == e:
                tok = p // K_ROUTE  # (pair offsets stay in int32: the GEMV path serves small M)
                h = _gemv_rows(w_ptr, s_ptr, rows, rmask, x_ptr + tok * H, H, BLOCK_K, FP8_CVT) + bias  # (R,)
                glu, lin = tl.split(tl.reshape(h, (BLOCK_U, 2)))
                out = _swiglu(glu, lin, limit, ACT_DTYPE)
                tl.store(act_ptr + p * I + units, out.to(act_ptr.dtype.element_ty), mask=units < I)

    @triton.jit
    def _mlp2_gemv_kernel(
        act_ptr,  # (M, I) by pair
        ids_ptr,  # (M,) expert id of each pair
        w_ptr,  # (E, H, I/32, 4) int32 view of the packed blocks
        s_ptr,  # (E, H, I/32) uint8
        b_ptr,  # (E, H)
        y_ptr,  # (M, H) out: expert output (with its bias), by pair
        M,
        E,
        H: tl.constexpr,
        I: tl.constexpr,
        MP: tl.constexpr,
        BLOCK_H: tl.constexpr,  # output rows per program
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
        FP8_CVT: tl.constexpr,
        SHARD: tl.constexpr,
    ):
        i = tl.program_id(0)
        j = tl.program_id(1)
        wait_for_prior_kernel(PDL)
        skip, e = _first_of_expert(ids_ptr, i, M, E, MP, SHARD)
        if skip:
            return
        hs = j * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,) output features
        hmask = hs < H
        rows = e.to(tl.int64) * H + hs
        bias = tl.load(b_ptr + rows, mask=hmask, other=0.0).to(tl.float32)
        for p in range(i, M):
            if tl.load(ids_ptr + p) == e:
                y = _gemv_rows(w_ptr, s_ptr, rows, hmask, act_ptr + p * I, I, BLOCK_K, FP8_CVT) + bias
                tl.store(y_ptr + p * H + hs, y.to(y_ptr.dtype.element_ty), mask=hmask)

    @triton.jit
    def _combine_kernel(y_ptr, rw_ptr, res_ptr, rows_ptr, out_ptr, H: tl.constexpr, K_ROUTE: tl.constexpr,
                        RESIDUAL: tl.constexpr, ROWS: tl.constexpr, SHARD: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
        """out[n] = sum_k w(n, k) * y[row of pair], pair = n * K + k (the row: rows[pair] with ROWS, else the
        pair), summed in float32 in a fixed order and cast to out's dtype (one launch instead of torch's sum +
        cast; no atomics, so deterministic). RESIDUAL:
        out[n] = res[n] + that sum, rounded as the pure path rounds (the sum to out's dtype first, then the add).
        SHARD: pairs of weight 0 (an expert shard's other ranks' pairs, whose y was never written) are not read."""
        n = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        hm = hs < H
        wait_for_prior_kernel(PDL)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K_ROUTE):
            p = n * K_ROUTE + k
            row = tl.load(rows_ptr + p).to(tl.int64) if ROWS else p
            w = tl.load(rw_ptr + p).to(tl.float32)
            read = tl.where(w != 0, hm, False) if SHARD else hm
            acc += w * tl.load(y_ptr + row * H + hs, mask=read, other=0.0).to(tl.float32)
        out = acc.to(out_ptr.dtype.element_ty)
        if RESIDUAL:
            out = (tl.load(res_ptr + n * H + hs, mask=hm, other=0.0).to(tl.float32) + out.to(tl.float32)).to(
                out_ptr.dtype.element_ty)
        tl.store(out_ptr + n * H + hs, out, mask=hm)

    # ------------------------------------------------------------------------------------------------------
    # Prefill: grouped GEMM. Grid (column blocks j, row tiles t): column blocks vary fastest, so the programs in
    # flight share the gathered activation tile (L2 hits). Tile t is found in-kernel from the per-expert row
    @triton.jit
    def _count_chunk_kernel(ids_ptr, counts_ptr, M, CHUNK: tl.constexpr, EP: tl.constexpr):
        """Program c: counts (EP,) of each expert among pairs c * CHUNK .. (c + 1) * CHUNK - 1 -> counts row c."""
        i = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        ex = tl.arange(0, EP)
        e = tl.load(ids_ptr + i, mask=i < M, other=EP)  # padding matches no expert
        tl.store(counts_ptr + tl.program_id(0) * EP + ex, tl.sum((e[:, None] == ex[None, :]).to(tl.int32), 0))

    @triton.jit
    def _group_pairs_kernel(ids_ptr, counts_ptr, order_ptr, seg_ptr, M, E, C, CHUNK: tl.constexpr, EP: tl.constexpr,
                            CB: tl.constexpr):
        """Program c places pairs c * CHUNK .. as a stable sort by expert orders them: order (M,) sorted row ->
        pair, and program 0 writes seg (E,), the end sorted row of each expert. Pair i goes to its expert's start
        + the pairs of that expert in earlier chunks (counts (C, EP), from `_count_chunk_kernel`; C == 1: none,
        counted here) + those before it in its own chunk (a (CHUNK, EP) one-hot in registers)."""
        c = tl.program_id(0)
        i = c * CHUNK + tl.arange(0, CHUNK)
        ex = tl.arange(0, EP)
        e = tl.load(ids_ptr + i, mask=i < M, other=EP)  # padding matches no expert
        onehot = (e[:, None] == ex[None, :]).to(tl.int32)  # (CHUNK, EP)
        if C == 1:
            totals = tl.sum(onehot, 0)
            before = tl.zeros((EP,), tl.int32)
        else:
            totals = tl.zeros((EP,), tl.int32)
            before = tl.zeros((EP,), tl.int32)
            for c0 in range(0, C, CB):  # the chunk counts, CB rows at a time
                cs = c0 + tl.arange(0, CB)
                n = tl.load(counts_ptr + cs[:, None] * EP + ex[None, :], mask=(cs < C)[:, None], other=0)
                totals += tl.sum(n, 0)
                before += tl.sum(tl.where((cs < c)[:, None], n, 0), 0)
        ends = tl.cumsum(totals, 0)
        earlier = tl.cumsum(onehot, 0) - onehot  # (CHUNK, EP) pairs of each expert before pair i in the chunk
        row = tl.sum(onehot * (ends - totals + before + earlier), 1)  # (CHUNK,) pair i's sorted row
        tl.store(order_ptr + row, i, mask=i < M)
        if c == 0:
            tl.store(seg_ptr + ex, ends, mask=ex < E)

    # ends of the sorted pairs (seg_ptr), for the kernel's own BM, so BM is autotuned with the rest.
    # ------------------------------------------------------------------------------------------------------
    @triton.jit
    def _tile(seg_ptr, t, E, EP: tl.constexpr, BM: tl.constexpr):
        """-> (expert or >= E if tile t is unused, first sorted row, end sorted row) of row tile t: each expert's
        rows seg_end[e-1] .. seg_end[e] split into BM-row tiles, tiles numbered expert by expert."""
        ei = tl.arange(0, EP)
        em = ei < E
        end = tl.load(seg_ptr + ei, mask=em, other=0)
        start = tl.load(seg_ptr + ei - 1, mask=em & (ei > 0), other=0)
        nt = (end - start + BM - 1) // BM
        t_end = tl.cumsum(nt, 0)
        e = tl.sum((t_end <= t).to(tl.int32), 0)
        sel = ei == e
        row0 = tl.sum(tl.where(sel, start + (t - (t_end - nt)) * BM, 0), 0)
        row_end = tl.sum(tl.where(sel, end, 0), 0)
        return e, row0, row_end

    @triton.jit
    def _dequant_tile(w_ptr, s_ptr, rows, rmask, k0, KDIM: tl.constexpr, BK: tl.constexpr, DENORM: tl.constexpr):
        """Packed rows (R,) int64 of a (rows, KDIM) MXFP4 matrix, inputs k0 .. k0+BK-1 -> (R, BK) float32."""
        KBYTES: tl.constexpr = KDIM // 2
        G: tl.constexpr = KDIM // 32
        NG: tl.constexpr = BK // 32
        R: tl.constexpr = rows.shape[0]
        g = k0 // 32 + tl.arange(0, NG)
        jb = tl.arange(0, 16)
        if KDIM % BK == 0:
            m3 = rmask[:, None, None]
            m2 = rmask[:, None]
        else:
            m3 = rmask[:, None, None] & (g < G)[None, :, None]
            m2 = rmask[:, None] & (g < G)[None, :]
        b = tl.load(w_ptr + rows[:, None, None] * KBYTES + g[None, :, None] * 16 + jb[None, None, :], mask=m3,
                    other=0)  # (R, NG, 16)
        s = tl.load(s_ptr + rows[:, None] * G + g[None, :], mask=m2, other=0)  # (R, NG)
        lo, hi = _fp4_unscaled(b, DENORM)
        sc = _scale_value(s)[:, :, None]
        return tl.reshape(tl.join(lo * sc, hi * sc), (R, BK))

    @triton.jit
    def _scaled_dot(acc, xt, w_ptr, s_ptr, rows, rmask, k0, KDIM: tl.constexpr, BK: tl.constexpr):
        """acc (BM, R) += xt (BM, BK) bf16 . W^T for packed rows (R,) of a (rows, KDIM) MXFP4 matrix, through
        tl.dot_scaled: the bytes and scales go to Triton as they are stored, and Triton decodes them in the MMA's
        register layout (on sm_90 no shared-memory round trip of the decoded tile, unlike _dequant_tile + tl.dot).
        Masked bytes are 0, so the scale there (127: 1.0) multiplies zeros."""
        KBYTES: tl.constexpr = KDIM // 2
        G: tl.constexpr = KDIM // 32
        kb = k0 // 2 + tl.arange(0, BK // 2)
        g = k0 // 32 + tl.arange(0, BK // 32)
        if KDIM % BK == 0:
            bm = rmask[:, None]
            sm = rmask[:, None]
        else:
            bm = rmask[:, None] & (kb < KBYTES)[None, :]
            sm = rmask[:, None] & (g < G)[None, :]
        b = tl.load(w_ptr + rows[:, None] * KBYTES + kb[None, :], mask=bm, other=0)  # (R, BK/2)
        s = tl.load(s_ptr + rows[:, None] * G + g[None, :], mask=sm, other=127)  # (R, BK/32)
        return tl.dot_scaled(xt, None, "bf16", tl.trans(b), s, "e2m1", acc=acc, fast_math=True)


    @triton.jit
    def _mlp1_swiglu_dot_kernel(
        x_ptr,  # (N, H)
        order_ptr,  # (M,) int32 sorted row -> pair
        seg_ptr,  # (E,) int32 end sorted row of each expert
        E,
        w_ptr,  # (E, 2I, H/32, 16) uint8
        s_ptr,  # (E, 2I, H/32) uint8
        b_ptr,  # (E, 2I)
        act_ptr,  # (M, I) out, sorted rows
        limit,
        tune_m,  # M rounded to a power of two: autotuning key only
        H: tl.constexpr,
        I: tl.constexpr,
        K_ROUTE: tl.constexpr,
        EP: tl.constexpr,  # power of two >= E
        BM: tl.constexpr,  # sorted rows per tile
        BN: tl.constexpr,  # SwiGLU units per program (2 * BN interleaved weight rows, one dot)
        BK: tl.constexpr,  # inputs per step
        SWAP: tl.constexpr,  # dot(W, x^T): the dequantized weights are the register (A) operand of the MMA
        SCALED: tl.constexpr,  # tl.dot_scaled on the packed tile (bf16 x only; not under the interpreter)
        DENORM: tl.constexpr,
        DOT_F32: tl.constexpr,  # upcast operands to fp32 (the CPU interpreter's bf16 dot is wrong)
    ):
        j = tl.program_id(0)
        e, start, end = _tile(seg_ptr, tl.program_id(1), E, EP, BM)
        if e >= E:
            return

        rows = start + tl.arange(0, BM)  # (BM,) sorted rows
        rmask = rows < end
        pair = tl.load(order_ptr + rows, mask=rmask, other=0)
        tok = (pair // K_ROUTE).to(tl.int64)

        local = j * (2 * BN) + tl.arange(0, 2 * BN)  # weight rows within the expert, gate/linear interleaved
        wmask = local < 2 * I
        wrows = e.to(tl.int64) * (2 * I) + local

        kx = tl.arange(0, BK)
        if SWAP:
            acc = tl.zeros((2 * BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            if H % BK == 0:
                xm = rmask[:, None]
            else:
                xm = rmask[:, None] & ((k0 + kx) < H)[None, :]
            xt = tl.load(x_ptr + tok[:, None] * H + (k0 + kx)[None, :], mask=xm, other=0.0)  # (BM, BK)
            if DOT_F32:
                xt = xt.to(tl.float32)
            if SCALED:
                acc = _scaled_dot(acc, xt, w_ptr, s_ptr, wrows, wmask, k0, H, BK)
            else:
                w = _dequant_tile(w_ptr, s_ptr, wrows, wmask, k0, H, BK, DENORM).to(xt.dtype)  # (2BN, BK)
                # "ieee": float32 operands (a float32 model) multiply exactly, not rounded to TF32 (no effect on bf16)
                if SWAP:
                    acc = tl.dot(w, tl.trans(xt), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
        if SWAP:
            acc = tl.trans(acc)  # (BM, 2BN)

        h = acc + tl.load(b_ptr + wrows, mask=wmask, other=0.0).to(tl.float32)[None, :]
        glu, lin = tl.split(tl.reshape(h, (BM, BN, 2)))
        out = _swiglu(glu, lin, limit, x_ptr.dtype.element_ty)  # (BM, BN)
        units = j * BN + tl.arange(0, BN)
        optr = act_ptr + rows.to(tl.int64)[:, None] * I + units[None, :]
        tl.store(optr, out.to(act_ptr.dtype.element_ty), mask=rmask[:, None] & (units < I)[None, :])

    @triton.jit
    def _mlp2_dot_kernel(
        act_ptr,  # (M, I) sorted rows
        order_ptr,  # (M,) int32
        seg_ptr,  # (E,) int32
        E,
        w_ptr,  # (E, H, I/32, 16) uint8
        s_ptr,  # (E, H, I/32) uint8
        b_ptr,  # (E, H)
        y_ptr,  # (M, H) out, original pair order
        tune_m,
        H: tl.constexpr,
        I: tl.constexpr,
        EP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,  # output features per program
        BK: tl.constexpr,
        SWAP: tl.constexpr,
        SCALED: tl.constexpr,
        DENORM: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        j = tl.program_id(0)
        e, start, end = _tile(seg_ptr, tl.program_id(1), E, EP, BM)
        if e >= E:
            return

        rows = start + tl.arange(0, BM)
        rmask = rows < end
        pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)

        hs = j * BN + tl.arange(0, BN)
        hmask = hs < H
        wrows = e.to(tl.int64) * H + hs

        kx = tl.arange(0, BK)
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I, BK):
            if I % BK == 0:
                am = rmask[:, None]
            else:
                am = rmask[:, None] & ((k0 + kx) < I)[None, :]
            at = tl.load(act_ptr + rows.to(tl.int64)[:, None] * I + (k0 + kx)[None, :], mask=am, other=0.0)
            if DOT_F32:
                at = at.to(tl.float32)
            if SCALED:
                acc = _scaled_dot(acc, at, w_ptr, s_ptr, wrows, hmask, k0, I, BK)
            else:
                w = _dequant_tile(w_ptr, s_ptr, wrows, hmask, k0, I, BK, DENORM).to(at.dtype)  # (BN, BK)
                if SWAP:
                    acc = tl.dot(w, tl.trans(at), acc, input_precision="ieee")
                else:
                    acc = tl.dot(at, tl.trans(w), acc, input_precision="ieee")
        if SWAP:
            acc = tl.trans(acc)  # (BM, BN)

        y = acc + tl.load(b_ptr + wrows, mask=hmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + pair[:, None] * H + hs[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & hmask[None, :])

    # ------------------------------------------------------------------------------------------------------
    # Launch configurations. On a GPU the kernels are autotuned once per key (shapes; M's power-of-two bucket for
    # the GEMMs), and the timings are kept in Triton's on-disk cache so that later processes skip the tuning;
    # outputs are fully rewritten, so autotuning reruns are safe. Under the
    # interpreter one fixed small config is used.
    # ------------------------------------------------------------------------------------------------------
    def _gemv_configs(rows_name: str, pairs: bool) -> list:
        out = []
        for rows, bk, warps in [(32, 256, 4), (32, 512, 4), (64, 256, 4), (64, 512, 8), (16, 512, 4),
                                (128, 256, 8), (16, 256, 2), (32, 256, 2)]:
            out.append(triton.Config({rows_name: rows // 2 if pairs else rows, "BLOCK_K": bk}, num_warps=warps,
                                     num_stages=1))
        return out

    def _dot_configs(mlp1: bool, scaled: bool = False) -> list:
        # (BM, BN, BK, SWAP, SCALED, warps, stages): the best four of each kernel at N = 1024 and 8192 on H100 out
        # of 13 (BN 32..256, BK 64/128, BM 64/128); mlp1's BN counts SwiGLU units (2 * BN weight rows). Plus two
        # with 32-row tiles for batched decode (16-64 tokens: a handful of rows per expert, so big row tiles are
        # padding). With bf16 activations (scaled): three tl.dot_scaled tiles, the best at 64 and 1024 tokens
        # (the dot_scaled experiment, see the module docstring: at 64 tokens 1.3x faster than the others, at 1024
        # on a par), and a 2-warp 16-row tile (scripts/moe_tiles.py: 302 us a layer call at 64 tokens
        # against 332 for the best 4-warp tile).
        cands = [(128, 64, 64, 1, 0, 8, 3), (64, 64, 64, 1, 0, 4, 3), (128, 64, 64, 0, 0, 8, 3),
                 (64, 64, 64, 0, 0, 4, 3), (32, 64, 128, 1, 0, 4, 4), (32, 128, 64, 1, 0, 4, 4)] \
            if mlp1 else \
            [(64, 128, 64, 0, 0, 4, 3), (128, 128, 128, 0, 0, 8, 3), (128, 128, 64, 1, 0, 8, 3),
             (64, 128, 64, 1, 0, 4, 3), (32, 128, 128, 1, 0, 4, 4), (32, 256, 64, 1, 0, 8, 3)]
        if scaled:
            bn = 64 if mlp1 else 128
            cands += [(16, bn, 128, 0, 1, 4, 4), (32, bn, 128, 0, 1, 4, 4), (64, bn, 128, 0, 1, 4, 3),
                      (16, 64, 128, 0, 1, 2, 3)]
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "SWAP": bool(sw), "SCALED": bool(sc)}, num_warps=w,
                              num_stages=s)
                for bm, bn, bk, sw, sc, w, s in cands]

    _TUNED: dict = {}

    def _tuned(name: str):
        """name: mlp1_gemv, mlp2_gemv, mlp1_dot, mlp2_dot, or mlp1_dot_bf16 / mlp2_dot_bf16 (with dot_scaled
        tiles, which take bf16 activations only)."""
        if name not in _TUNED:
            configs, key, kernel = {
                "mlp1_gemv": (_gemv_configs("BLOCK_U", True), ["H", "I"], _mlp1_swiglu_gemv_kernel),
                "mlp2_gemv": (_gemv_configs("BLOCK_H", False), ["H", "I"], _mlp2_gemv_kernel),
                # E in the key: 20b and 120b share H and I, but 4x the experts means 4x fewer rows per expert
                # at the same token count, so another best row tile
                "mlp1_dot": (_dot_configs(True, False), ["H", "I", "E", "tune_m"], _mlp1_swiglu_dot_kernel),
                "mlp2_dot": (_dot_configs(False, False), ["H", "I", "E", "tune_m"], _mlp2_dot_kernel),
                "mlp1_dot_bf16": (_dot_configs(True, True), ["H", "I", "E", "tune_m"], _mlp1_swiglu_dot_kernel),
                "mlp2_dot_bf16": (_dot_configs(False, True), ["H", "I", "E", "tune_m"], _mlp2_dot_kernel),
            }[name]
            _TUNED[name] = triton.autotune(configs, key=key, cache_results=True)(kernel)
        return _TUNED[name]


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32} if HAS_TRITON else {}


def _empty(shape, dtype, device) -> torch.Tensor:
    """Intermediate buffers (tests replace this with a NaN-filled allocation to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _denorm_default() -> bool:
    """FP4 decode form in the GEMM path: 'denorm' (fewer ops; default) or 'safe' (GPTOSS_MXFP4_DEQUANT=safe)."""
    return os.environ.get("GPTOSS_MXFP4_DEQUANT", "denorm") != "safe"


_SCALES_FIT: dict[int, tuple] = {}  # id(scales) -> (weak reference, version, fits)


def _scales_fit(scales: torch.Tensor) -> bool:
    """Whether every scale byte is at most moe_mma.MAX_SCALE_BYTE (its kernels' bf16 multiplier stays finite),
    remembered per tensor and version: the check reads the maximum back once, so under CUDA-graph capture an
    unchecked tensor counts as not fitting."""
    from gptoss.kernels.moe_mma import MAX_SCALE_BYTE

    known = _SCALES_FIT.get(id(scales))
    if known is None or known[0]() is not scales or known[1] != scales._version:
        if scales.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        key = id(scales)
        ref = weakref.ref(scales, lambda _: _SCALES_FIT.pop(key, None))
        known = (ref, scales._version, int(scales.max()) <= MAX_SCALE_BYTE)
        _SCALES_FIT[key] = known
    return known[2]


def _tensor_core_serves(available, x: torch.Tensor, mlp1_scales: torch.Tensor, mlp2_scales: torch.Tensor) -> bool:
    """Whether a Gluon tensor-core GEMM serves: not interpreting, available(x) (its device and dtype check), and
    every scale byte within its bf16 multiplier's range."""
    return not triton_interpreting() and available(x) and _scales_fit(mlp1_scales) and _scales_fit(mlp2_scales)


def _mma_gemm_serves(x: torch.Tensor, mlp1_scales: torch.Tensor, mlp2_scales: torch.Tensor) -> bool:
    from gptoss.kernels.moe_mma import mma_gemm_available

    return _tensor_core_serves(mma_gemm_available, x, mlp1_scales, mlp2_scales)


def _wgmma_gemm_serves(x: torch.Tensor, mlp1_scales: torch.Tensor, mlp2_scales: torch.Tensor) -> bool:
    from gptoss.kernels.moe_wgmma import wgmma_gemm_available

    return _tensor_core_serves(wgmma_gemm_available, x, mlp1_scales, mlp2_scales)


def _dense_gemm_serves(x: torch.Tensor) -> bool:
    from gptoss.kernels.moe_dense import dense_gemm_available

    return (x.is_cuda or triton_interpreting()) and dense_gemm_available(x)


def _gemm_kernels(n: int, pairs: int, x: torch.Tensor, mlp1_scales: torch.Tensor, mlp2_scales: torch.Tensor) -> str:
    """The grouped GEMM that path "gemm" runs for n tokens whose (token, expert) pairs on these experts number
    `pairs`: the tensor-core kernels where they serve
    (moe_mma up to MMA_MAX_TOKENS), the dequantizing grouped GEMM where it pays (long prefills), Hopper's
    moe_wgmma in between, else this module's."""
    from gptoss.kernels.moe_dense import dense_gemm_pays

    if n <= MMA_MAX_TOKENS and _mma_gemm_serves(x, mlp1_scales, mlp2_scales):
        return "gemm_mma"
    if n > MMA_MAX_TOKENS and dense_gemm_pays(x, pairs, mlp1_scales):
        return "gemm_dense"
    if n > MMA_MAX_TOKENS and _wgmma_gemm_serves(x, mlp1_scales, mlp2_scales):
        return "gemm_wgmma"
    return "gemm_triton"


def moe_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    mlp1_blocks: torch.Tensor,
    mlp1_scales: torch.Tensor,
    mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor,
    mlp2_scales: torch.Tensor,
    mlp2_bias: torch.Tensor,
    swiglu_limit: float,
    *,
    residual: torch.Tensor | None = None,
    x_float32: torch.Tensor | None = None,
    path: str = "auto",
    config: dict | None = None,
    denorm: bool | None = None,
    first_expert: int | None = None,
    num_experts: int | None = None,
) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{ids[:, k]}(x) as (N, H) in x's dtype; the same function as
    gptoss.kernels.moe.moe with MXFP4 expert stores, computed from the packed bytes.

    residual (N, H): returns residual + that sum instead (the block's residual add, fused into the last kernel).
    x_float32: x.float() when the caller already has it (the fused norm writes it); the GEMV path reads it.
    first_expert, num_experts: an expert-parallel shard's call (gptoss.parallel), whose stores hold global experts
      first_expert .. first_expert + E - 1 of num_experts: only the pairs routed to them are computed, and the
      result is their float32 partial sum (gptoss.kernels.moe.moe_partial's function), for the ranks to add up.

    path: "auto" (by N, see MMA_MIN_TOKENS above), "gemv", "gemm" (the tensor-core kernels where they serve:
      `gptoss.kernels.moe_mma` up to MMA_MAX_TOKENS, `gptoss.kernels.moe_wgmma` above on Hopper when asked for,
      `gptoss.kernels.moe_dense` where it pays; else this module's), or one of them: "gemm_mma", "gemm_wgmma",
      "gemm_dense", "gemm_triton".
    config: fixed kernel parameters instead of autotuning (always used under TRITON_INTERPRET=1):
      gemv: {"BLOCK_U", "BLOCK_H", "BLOCK_K", "num_warps"};
      gemm_triton: {"BM", "BN", "BK", "SWAP", "SCALED", "num_warps", "num_stages"};
      gemm_mma, gemm_wgmma: {"R", "T", "num_warps"}.
    denorm: FP4 decode in the GEMM path (None: GPTOSS_MXFP4_DEQUANT, default the fp32-subnormal trick).
    Contract: the K ids of one token are distinct (top-k gives that); the GEMV path relies on it.
    No host synchronization: the call can be captured in a CUDA graph (after a first, autotuning call).
    """
    if not HAS_TRITON:
        raise RuntimeError("moe_triton needs triton")
    N, H = x.shape
    K = expert_ids.shape[1]
    E, R1, G1, _ = mlp1_blocks.shape
    I = R1 // 2
    if mlp1_blocks.dtype != torch.uint8 or mlp2_blocks.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks must be uint8")
    if G1 * 32 != H or tuple(mlp2_blocks.shape) != (E, H, I // 32, 16) or I % 32 != 0:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, mlp1 {tuple(mlp1_blocks.shape)}, "
                         f"mlp2 {tuple(mlp2_blocks.shape)}")
    if mlp1_scales.shape != mlp1_blocks.shape[:-1] or mlp2_scales.shape != mlp2_blocks.shape[:-1]:
        raise ValueError("MXFP4 scales do not match blocks")
    for t in (mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias):
        if not t.is_contiguous():
            raise ValueError("expert tensors must be contiguous")
    if N == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"x {tuple(x.shape)} {x.dtype}")
    M = N * K
    dev = x.device
    interp = triton_interpreting()
    limit = float(swiglu_limit)
    shard = first_expert is not None
    out_dtype = torch.float32 if shard else x.dtype
    pairs_held = M  # the pairs routed to these experts: all of them, or (by expectation) a shard's share
    if shard:
        if residual is not None or num_experts is None:
            raise ValueError("an expert shard's call takes num_experts and no residual (added after the ranks' sum)")
        pairs_held = M * E // num_experts
        local = expert_ids - first_expert
        held = (local >= 0) & (local < E)
        expert_ids = torch.where(held, local, E)  # other ranks' pairs: expert id E, grouped last and never run
        weights = torch.where(held, weights, 0)  # and never read by the combine

    if path == "auto":
        if gemv_serves(N):
            path = "gemv"
        else:
            path = _gemm_kernels(N, pairs_held, x, mlp1_scales, mlp2_scales)
            if path == "gemm_triton" and N <= DECODE_MAX_TOKENS:
                path = "gemv"

    if path == "gemv":
        # no sort: each program scans the (few) expert ids itself; act and y are indexed by pair
        ids = expert_ids.reshape(-1).contiguous()
        MP = _next_pow2(M)
        w1 = mlp1_blocks.view(torch.int32)  # (E, 2I, H/32, 4) words
        w2 = mlp2_blocks.view(torch.int32)
        # fp32 activations: a thread multiplies each activation it loads into only one weight row, so a
        # bf16 -> fp32 conversion in the kernel would cost ~1.5 instructions per weight element
        xf = x.float() if x_float32 is None else x_float32
        act = _empty((M, I), torch.float32, dev)
        y = _empty((M, H), x.dtype, dev)  # expert outputs by pair, rounded as the pure path's F.linear rounds them
        if config is None and not interp:
            k1, k2 = _tuned("mlp1_gemv"), _tuned("mlp2_gemv")
            c1 = c2 = {}
        else:
            c = {"BLOCK_U": 64, "BLOCK_H": 128, "BLOCK_K": 256, "num_warps": 4, **(config or {})}
            k1, k2 = _mlp1_swiglu_gemv_kernel, _mlp2_gemv_kernel
            c1 = {"BLOCK_U": c["BLOCK_U"], "BLOCK_K": c["BLOCK_K"], "num_warps": c["num_warps"], "num_stages": 1}
            c2 = {"BLOCK_H": c["BLOCK_H"], "BLOCK_K": c["BLOCK_K"], "num_warps": c["num_warps"], "num_stages": 1}
        pdl = pdl_enabled(x)
        # the FP4 decode through e4m3 conversions where they exist (sm_89 and later): 3.5% faster decode on H100
        fp8 = not interp and arch_switch("FP8_CVT", cuda_arch(x))
        k1[lambda m: (M, triton.cdiv(I, m["BLOCK_U"]))](
            xf, ids, w1, mlp1_scales, mlp1_bias, act, M, E, limit, H=H, I=I, K_ROUTE=K, MP=MP, PDL=pdl,
            ACT_DTYPE=_TL_DTYPES[x.dtype], FP8_CVT=fp8, SHARD=shard,
            launch_pdl=pdl, **c1)
        k2[lambda m: (M, triton.cdiv(H, m["BLOCK_H"]))](act, ids, w2, mlp2_scales, mlp2_bias, y, M, E, H=H, I=I,
                                                         MP=MP, PDL=pdl, FP8_CVT=fp8, SHARD=shard, launch_pdl=pdl,
                                                         **c2)
        return _combine(y, weights, residual, out_dtype, shard=shard)

    if path not in ("gemm", "gemm_mma", "gemm_wgmma", "gemm_dense", "gemm_triton"):
        raise ValueError(f"path must be 'auto', 'gemv', 'gemm', 'gemm_mma', 'gemm_wgmma', 'gemm_dense' or "
                         f"'gemm_triton', got {path!r}")
    if path == "gemm":
        path = _gemm_kernels(N, pairs_held, x, mlp1_scales, mlp2_scales)
    elif path == "gemm_mma" and not _mma_gemm_serves(x, mlp1_scales, mlp2_scales):
        raise ValueError("the tensor-core GEMM (gptoss.kernels.moe_mma) does not serve these inputs")
    elif path == "gemm_wgmma" and not _wgmma_gemm_serves(x, mlp1_scales, mlp2_scales):
        raise ValueError("the Hopper GEMM (gptoss.kernels.moe_wgmma) does not serve these inputs")
    elif path == "gemm_dense" and not _dense_gemm_serves(x):
        raise ValueError("the dequantizing grouped GEMM (gptoss.kernels.moe_dense) does not serve these inputs")
    denorm = _denorm_default() if denorm is None else denorm
    # the kernels run the experts' segments only: a shard's other ranks' pairs (expert E) sort after them
    order, seg_end = group_pairs(expert_ids.reshape(-1), E + 1 if shard else E)
    seg_end = seg_end[:E]
    if path in ("gemm_mma", "gemm_wgmma"):
        from gptoss.kernels.moe_mma import mlp_mma_gemm
        from gptoss.kernels.moe_wgmma import mlp_wgmma_gemm

        gemm = mlp_mma_gemm if path == "gemm_mma" else mlp_wgmma_gemm
        y = gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                 limit, K, config=config)
        return _combine(y, weights, residual, out_dtype, shard=shard)
    if path == "gemm_dense":
        from gptoss.kernels.moe_dense import mlp_dense_gemm

        y, rows = mlp_dense_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                                 mlp2_bias, limit, K)
        return _combine(y, weights, residual, out_dtype, rows=rows, shard=shard)
    act = _empty((M, I), x.dtype, dev)  # SwiGLU output, sorted rows
    y = _empty((M, H), x.dtype, dev)  # expert outputs, pair order
    EP = _next_pow2(E)
    tune_m = max(64, _next_pow2(M))
    n_tiles = lambda bm: _cdiv(M, bm) + min(E, M)  # noqa: E731 - bound on the tiles of any routing
    if config is None and not interp:
        bf16 = "_bf16" if x.dtype == torch.bfloat16 else ""
        k1, k2 = _tuned("mlp1_dot" + bf16), _tuned("mlp2_dot" + bf16)
        c = {}
    else:
        k1, k2 = _mlp1_swiglu_dot_kernel, _mlp2_dot_kernel
        c = {"BM": 16, "BN": 32, "BK": 64, "SWAP": False, "SCALED": False, "num_warps": 4, "num_stages": 2,
             **(config or {})}
        if c["SCALED"] and (interp or x.dtype != torch.bfloat16):
            raise ValueError("SCALED (tl.dot_scaled) tiles need bf16 activations on a GPU")
    k1[lambda m: (triton.cdiv(I, m["BN"]), n_tiles(m["BM"]))](
        x, order, seg_end, E, mlp1_blocks, mlp1_scales, mlp1_bias, act, limit, tune_m,
        H=H, I=I, K_ROUTE=K, EP=EP, DENORM=denorm, DOT_F32=interp, **c)
    k2[lambda m: (triton.cdiv(H, m["BN"]), n_tiles(m["BM"]))](
        act, order, seg_end, E, mlp2_blocks, mlp2_scales, mlp2_bias, y, tune_m,
        H=H, I=I, EP=EP, DENORM=denorm, DOT_F32=interp, **c)
    return _combine(y, weights, residual, out_dtype, shard=shard)


# Pairs one program groups alone: a (pairs, experts) one-hot of at most GROUP_ONEHOT int32 in registers (1,024
# pairs of 32 experts; a 64-token batched decode step has 256). torch.sort's grouping took ~28 us of small kernels a
# layer on an H100 at 64 tokens (radix sort, scatter_add, two cumsum scans, casts), against 2.8 us for one program.
# More pairs take one more launch, which counts each chunk's pairs first, in chunks of GROUP_CHUNK_ONEHOT one-hot
# entries (128 pairs of 32 experts): small chunks keep each program's one-hot in registers and give the launch more
# programs. A 1k prefill's 4,096 pairs (H100, scripts/profile_prefill.py): 5.2 us in 32 chunks against 12.9 in 4
# chunks of 1,024 (chunks of 64 and 32 pairs: 4.4 and 4.2 us); torch.sort's grouping took ~25 us and copies.
GROUP_ONEHOT = 32768
GROUP_CHUNK_ONEHOT = 4096


def group_pairs(flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat_ids (M,) expert of each (token, expert) pair -> (order (M,) int32 sorted row -> pair, seg_end (E,)
    int32 end sorted row of each expert): the pairs grouped by expert, in pair order within an expert (a stable
    sort). No host synchronization."""
    m = flat_ids.numel()
    ep = _next_pow2(num_experts)
    one_launch = _next_pow2(m) * ep <= GROUP_ONEHOT
    chunk = max(16, _next_pow2(m) if one_launch else GROUP_CHUNK_ONEHOT // ep)
    chunks = _cdiv(m, chunk)
    ids = flat_ids.contiguous()
    order = torch.empty(m, dtype=torch.int32, device=ids.device)
    seg_end = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    warps = 4 if chunk * ep <= 8192 else 8
    counts = order  # not read with one chunk
    if chunks > 1:
        counts = torch.empty((chunks, ep), dtype=torch.int32, device=ids.device)
        _count_chunk_kernel[(chunks,)](ids, counts, m, CHUNK=chunk, EP=ep, num_warps=warps)
    count_rows = max(1, min(_next_pow2(chunks), 4096 // ep))  # rows of counts the second kernel loads at a time
    _group_pairs_kernel[(chunks,)](ids, counts, order, seg_end, m, num_experts, chunks, CHUNK=chunk, EP=ep,
                                   CB=count_rows, num_warps=warps)
    return order, seg_end


def _combine(y: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None, dtype,
             rows: torch.Tensor | None = None, shard: bool = False) -> torch.Tensor:
    """y (N * K, H) expert outputs by pair (or where rows (N * K,) int32 says each pair's is), weights (N, K) ->
    (N, H): the routing-weighted sum (+ residual). shard: pairs of weight 0 are not read (see _combine_kernel)."""
    n, k = weights.shape
    h = y.shape[1]
    out = torch.empty((n, h), device=y.device, dtype=dtype)
    block = 1024
    res = out if residual is None else residual.contiguous()
    pdl = pdl_enabled(y)
    _combine_kernel[(n, triton.cdiv(h, block))](y, weights.reshape(-1).contiguous(), res,
                                                y if rows is None else rows, out, H=h, K_ROUTE=k,
                                                RESIDUAL=residual is not None, ROWS=rows is not None, SHARD=shard,
                                                BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def moe_triton_from_stores(x, weights, expert_ids, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias, swiglu_limit,
                           **kwargs) -> torch.Tensor:
    """Same signature as gptoss.kernels.moe.moe, taking MXFP4Experts stores (with .blocks / .scales)."""
    return moe_triton(x, weights, expert_ids, mlp1_weight.blocks, mlp1_weight.scales, mlp1_bias,
                      mlp2_weight.blocks, mlp2_weight.scales, mlp2_bias, swiglu_limit, **kwargs)
