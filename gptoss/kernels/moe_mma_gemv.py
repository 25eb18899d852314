"""MoE decode on the tensor cores: the MXFP4 GEMV as `mma.sync` m16n8k16 with the packed expert rows as operand A.

The CUDA-core GEMV (`moe_triton`'s decode path) spends ~5.7 instructions a weight decoding FP4 and multiplying,
and on Hopper that, not memory, bounds it (Nsight Compute: ~34% of DRAM bandwidth, README "Where the time goes").
Here each 32-input block of a row is decoded straight into the register layout of the MMA's A operand and
multiplied on the tensor cores, ~2 instructions a weight:

  * Lane (g, t) of a warp loads one 32-bit word per row (rows g and g + 8 of its 16-row tile): bytes 4t .. 4t+3 of
    the row's 16-byte block, i.e. inputs 8t .. 8t+7. That is the operand layout of an fp16 MMA whose k-width is 8
    (Gluon's DotOperandLayout(0, mma, k_width=8)); the activations take the matching B layout, so the product is
    the plain dot product with no shuffles.
  * FP4 -> fp16 in 11 instructions for 8 weights (`_FP4_TO_F16`): the code's sign, exponent and mantissa bits are
    moved into an fp8 e4m3 byte as sign | exponent field e | mantissa top bit m, which is the FP4 value times 2^-6
    (code 1 = 0.5 lands on the e4m3 subnormal 2^-7), and `cvt.rn.f16x2.e4m3x2` (sm_89+) widens two at a time.
  * Each block's two MMAs start from zero and the block scale 2^(s - 127) (times 2^6, and 2^XSHIFT for the
    activations' scaling) is applied to the fp32 partial sums: exact, since both are powers of two.
  * The activations (float32) are multiplied by 2^-XSHIFT and rounded to fp16: the model's activations are bf16
    values, which fp16 holds exactly from 2^(XSHIFT-17) to 2^(XSHIFT+16) in magnitude; XSHIFT = 8 keeps anything
    below 2^24 finite, and what fp16 rounds (magnitudes under 2^-9) moves a dot product by under 2^-17 times the
    weights' sum. Products and sums are fp32 in the tensor cores.

Columns of the MMA are the tokens: with N <= 8 tokens and each token's K experts distinct, an expert serves at most
one pair a token, so column n is token n (zero when token n is not routed to the expert) and one pass over an
expert's rows serves all its pairs. Grid and outputs are the CUDA-core GEMV's (`moe_triton`): program (i, j) runs
only if pair i is the first pair of its expert and computes row block j for all of them; act and y are by pair.

Needs Gluon (Triton 3.6's `triton.experimental.gluon`) and sm_89+ for the fp8 conversion; `mma_gemv_available`
says whether this path serves, and `moe_triton` falls back to the CUDA-core GEMV otherwise.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl  # noqa: F401 - Triton's interpreter looks it up in a jit function's module

try:  # Gluon's API is experimental: any mismatch disables this path, never the package
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from gptoss.kernels.pdl import wait_for_prior_kernel
    from gptoss.kernels.swiglu_triton import swiglu_rounded

    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False

MAX_TOKENS = 8  # the MMA's N: one column a token
XSHIFT = 8  # activations enter the MMA as fp16(x * 2^-XSHIFT), see the module docstring


@triton.jit
def mma_input_column(k):
    """Where input k of a row is stored in `mma_input` form: within each 8 inputs, the even ones first
    (8t + 2j + h -> 8t + 4h + j), the order in which a lane's FP4 decode produces its weights."""
    return (k & ~7) | ((k & 1) << 2) | ((k >> 1) & 3)


def mma_input(x: torch.Tensor) -> torch.Tensor:
    """(N, H) activations -> the tensor-core GEMV's input: fp16(x * 2^-XSHIFT), each row's inputs permuted as
    `mma_input_column` says. (The decode step's fused RMSNorm writes this form directly.)"""
    if x.shape[1] % 32:
        raise ValueError(f"the tensor-core GEMV takes rows of 32-input blocks, got {x.shape[1]} inputs")
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    out[:, mma_input_column.fn(torch.arange(x.shape[1], device=x.device))] = (x.float() * 2.0 ** -XSHIFT).half()
    return out

# Launch configurations (rows a program, warps, K slices, 32-input blocks a loop step), autotuned on the first call.
_CONFIGS = [(16, 4, 4, 4), (16, 4, 4, 8), (32, 4, 2, 5), (32, 8, 4, 4), (16, 8, 8, 4), (64, 8, 2, 5),
            (32, 4, 4, 4), (32, 4, 4, 6)]


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def mma_gemv_available(x: torch.Tensor) -> bool:
    """Whether the tensor-core GEMV serves x's device: Gluon importable, sm_89+ (e4m3 conversion), not turned off
    with GPTOSS_MOE_GEMV=cuda_cores."""
    return (HAS_GLUON and x.is_cuda and os.environ.get("GPTOSS_MOE_GEMV", "mma") != "cuda_cores"
            and _capable(x.device.index if x.device.index is not None else torch.cuda.current_device()))


if HAS_GLUON:
    # 4 packed bytes (8 FP4 codes, inputs 2b and 2b + 1 in byte b's low and high nibble) -> the 4 low-nibble
    # values and the 4 high-nibble values as fp16, each FP4 value times 2^-6 (see the module docstring).
    _FP4_TO_F16 = gl.constexpr("""{
    .reg .b32 a, b;
    .reg .b16 l0, l1;
    and.b32 a, $4, 0x07070707;
    shl.b32 a, a, 2;
    shl.b32 b, $4, 4;
    and.b32 b, b, 0x80808080;
    or.b32 a, a, b;
    mov.b32 {l0, l1}, a;
    cvt.rn.f16x2.e4m3x2 $0, l0;
    cvt.rn.f16x2.e4m3x2 $1, l1;
    and.b32 a, $4, 0x70707070;
    shr.b32 a, a, 2;
    and.b32 b, $4, 0x80808080;
    or.b32 a, a, b;
    mov.b32 {l0, l1}, a;
    cvt.rn.f16x2.e4m3x2 $2, l0;
    cvt.rn.f16x2.e4m3x2 $3, l1;
    }""")

    @gluon.constexpr_function
    def _log2(n):
        return n.bit_length() - 1

    @gluon.constexpr_function
    def _mma_layout(ks, nw):
        """(KS, R, 8) accumulators: KS slices of the input dimension, each warp one slice of 16-row tiles."""
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[ks, nw // ks, 1], instr_shape=[1, 16, 8])

    @gluon.constexpr_function
    def _warp_bases(ks, nw, rank, rows_dim, rows_step):
        # the MMA layout's warp order: row tiles first, then K slices (dimension 0)
        def basis(dim, v):
            out = [0] * rank
            out[dim] = v
            return out
        rows = [basis(rows_dim, rows_step << w) if rows_dim is not None else [0] * rank
                for w in range(_log2(nw // ks))]
        return rows + [basis(0, 1 << w) for w in range(_log2(ks))]

    @gluon.constexpr_function
    def _step_bytes_layout(ks, r, gs, nw):
        """(KS, R, 16, GS) packed bytes of GS consecutive blocks per K slice: lane (g, t) holds bytes 4t .. 4t+3
        (registers 0-1) of rows g and g + 8 (register 2) of its warp's 16-row tiles; further tiles, then the GS
        blocks, in registers."""
        nwr = nw // ks
        tiles = [[0, 16 * nwr << m, 0, 0] for m in range(_log2(r // (16 * nwr)))]
        blocks = [[0, 0, 0, 1 << q] for q in range(_log2(gs))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 8, 0, 0]] + tiles + blocks,
                                          lane_bases=[[0, 0, 4, 0], [0, 0, 8, 0], [0, 1, 0, 0], [0, 2, 0, 0],
                                                      [0, 4, 0, 0]],
                                          warp_bases=_warp_bases(ks, nw, 4, 1, 16), block_bases=[],
                                          shape=[ks, r, 16, gs])

    @gluon.constexpr_function
    def _step_scales_layout(ks, r, gs, nw):
        """(KS, R, GS) block scales: lane (g, t) holds rows g and g + 8 (as the MMA's accumulators), GS blocks in
        registers."""
        nwr = nw // ks
        tiles = [[0, 16 * nwr << m, 0] for m in range(_log2(r // (16 * nwr)))]
        blocks = [[0, 0, 1 << q] for q in range(_log2(gs))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 8, 0]] + tiles + blocks,
                                          lane_bases=[[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
                                          warp_bases=_warp_bases(ks, nw, 3, 1, 16), block_bases=[],
                                          shape=[ks, r, gs])

    @gluon.constexpr_function
    def _step_acts_layout(ks, gs, nw):
        """(KS, 32, 8, GS) activations of GS blocks per K slice: lane (g, t) holds inputs 8t .. 8t+7 of column g
        (the warps of one slice hold the same), GS blocks in registers."""
        blocks = [[0, 0, 0, 1 << q] for q in range(_log2(gs))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]] + blocks,
                                          lane_bases=[[0, 8, 0, 0], [0, 16, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0],
                                                      [0, 0, 4, 0]],
                                          warp_bases=_warp_bases(ks, nw, 4, None, 0), block_bases=[],
                                          shape=[ks, 32, 8, gs])

    @gluon.constexpr_function
    def _column_layout(ks, gs, nw):
        """Layout of the 8 activation rows (columns of the MMA) as `_mma_gemv_rows` takes them."""
        return gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, _step_acts_layout(ks, gs, nw))))

    @gluon.constexpr_function
    def _out_layout(ks, nw):
        """Layout of `_mma_gemv_rows`' (R, 8) result."""
        return gl.SliceLayout(0, _mma_layout(ks, nw))

    @gluon.jit
    def _blocks(t, GS: gl.constexpr):
        """t (..., GS) with GS (1, 2 or 4) in registers -> the GS slices t[..., q] in order q = 0 .. GS-1."""
        if GS == 1:
            return (gl.reshape(t, t.shape[:-1]),)
        elif GS == 2:
            return gl.split(t)
        else:
            even, odd = gl.split(gl.reshape(t, t.shape[:-1] + [2, 2]))  # index 2a + b: b = 0 holds q = 0, 2
            q0, q2 = gl.split(even)
            q1, q3 = gl.split(odd)
            return q0, q1, q2, q3

    @gluon.jit
    def _load_step(w_ptrs, s_ptrs, x_ptrs, w_ok, s_ok, x_ok, w_ks, s_ks, x_ks, w_q, s_q, x_q, j0,
                   G: gl.constexpr, GK: gl.constexpr, EVEN: gl.constexpr):
        """Blocks j0 .. j0 + GS - 1 of each K slice (packed bytes, scales, activations); past the slice's end or
        the matrix's, masked (no memory traffic) to zeros."""
        if EVEN:
            wb = gl.load(w_ptrs + j0 * 16, mask=w_ok, other=0)
            s = gl.load(s_ptrs + j0, mask=s_ok, other=0)
            xv = gl.load(x_ptrs + j0 * 32, mask=x_ok, other=0.0)
        else:  # block j of slice ks exists if j < GK and ks * GK + j < G
            wj = j0 + w_q
            sj = j0 + s_q
            xj = j0 + x_q
            wb = gl.load(w_ptrs + j0 * 16, mask=w_ok & (wj < GK) & (w_ks * GK + wj < G), other=0)
            s = gl.load(s_ptrs + j0, mask=s_ok & (sj < GK) & (s_ks * GK + sj < G), other=0)
            xv = gl.load(x_ptrs + j0 * 32, mask=x_ok & (xj < GK) & (x_ks * GK + xj < G), other=0.0)
        return wb, s, xv

    @gluon.jit
    def _mma_step(acc, wb, s, xv, R: gl.constexpr, KS: gl.constexpr, GS: gl.constexpr, XSHIFT: gl.constexpr,
                  NW: gl.constexpr):
        """acc (KS, R, 8) += the products of one step's GS blocks, each block's two MMAs scaled by its scales."""
        mma: gl.constexpr = _mma_layout(KS, NW)
        a_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b_dot: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        lo, hi = gl.inline_asm_elementwise(_FP4_TO_F16, "=r,=r,=r,=r,r", [wb], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=4)
        # 2^(s - 127) * 2^6 (fp8 offset) * 2^XSHIFT as float32 bits
        sc = ((s.to(gl.int32) + (6 + XSHIFT)) << 23).to(gl.float32, bitcast=True)
        zero = gl.zeros([KS, R, 8], gl.float32, mma)
        for q in gl.static_range(GS):
            # (KS, R, 16, 2) = (KS, R, 4 t, 4 j, 2 h) -> (.., t, h, j): MMA input 8t + 4h + j is byte 4t + j's
            # nibble h, the order in which the activations are stored (`mma_input`)
            a = gl.join(_blocks(lo, GS)[q], _blocks(hi, GS)[q])
            a = gl.reshape(gl.permute(gl.reshape(a, [KS, R, 4, 4, 2]), [0, 1, 2, 4, 3]), [KS, R, 32])
            b = gl.convert_layout(_blocks(xv, GS)[q], b_dot)
            part = mma_v2(gl.convert_layout(a, a_dot), b, zero)
            acc += part * gl.convert_layout(_blocks(sc, GS)[q], gl.SliceLayout(2, mma))[:, :, None]
        return acc

    @gluon.jit
    def _mma_gemv_rows(w_ptr, s_ptr, row0, nrows, x_ptr, xrow, xmask, KDIM: gl.constexpr, R: gl.constexpr,
                       KS: gl.constexpr, GS: gl.constexpr, XSHIFT: gl.constexpr, NW: gl.constexpr):
        """sum_k W[row0 + r, k] * X[xrow[n], k] for r < R (rows past nrows read as zeros) of a (rows, KDIM) MXFP4
        matrix and 8 activation rows of a (., KDIM) fp16 matrix in `mma_input` form (xrow: int64, xmask: masked
        columns count as zeros; both in `_column_layout`) -> (R, 8) float32 in `_out_layout`.

        The input dimension is cut into KS slices, one per group of warps, summed at the end: with one 16-row tile
        a warp, a K slice per warp is what gives the GPU enough warps (loads in flight) at one token. A loop step
        covers GS blocks of each slice (unrolled: all its loads are issued first)."""
        mma: gl.constexpr = _mma_layout(KS, NW)
        bl: gl.constexpr = _step_bytes_layout(KS, R, 1, NW)
        sl: gl.constexpr = _step_scales_layout(KS, R, 1, NW)
        xl: gl.constexpr = _step_acts_layout(KS, 1, NW)
        G: gl.constexpr = KDIM // 32
        GK: gl.constexpr = (G + KS - 1) // KS  # blocks per K slice
        EVEN: gl.constexpr = (G % KS == 0) and (GK % GS == 0)
        # index vectors broadcast to (KS, R, 16, 1) bytes, (KS, R, 1) scales, (KS, 32, 8, 1) activations
        w_ks = gl.arange(0, KS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, bl))))[:, None, None, None]
        w_r = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, bl))))[None, :, None, None]
        w_b = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, bl))))[None, None, :, None]
        s_ks = gl.arange(0, KS, layout=gl.SliceLayout(1, gl.SliceLayout(2, sl)))[:, None, None]
        s_r = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, sl)))[None, :, None]
        x_ks = gl.arange(0, KS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, xl))))[:, None, None, None]
        x_k = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, xl))))[None, :, None, None]
        zq = gl.arange(0, 1, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, bl))))[None, None, None, :]
        sq = gl.arange(0, 1, layout=gl.SliceLayout(0, gl.SliceLayout(1, sl)))[None, None, :]
        xq = gl.arange(0, 1, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, xl))))[None, None, None, :]
        w_ptrs = w_ptr + (row0 + w_r) * (G * 16) + w_ks * (GK * 16) + w_b + zq
        s_ptrs = s_ptr + (row0 + s_r) * G + s_ks * GK + sq
        x_ptrs = x_ptr + xrow[None, None, :, None] * KDIM + x_ks * (GK * 32) + x_k + xq
        w_ok = w_r < nrows
        s_ok = s_r < nrows
        x_ok = xmask[None, None, :, None]
        acc = gl.zeros([KS, R, 8], gl.float32, mma)
        for j0 in range(0, GK, GS):
            for jj in gl.static_range(GS):
                wb, s, xv = _load_step(w_ptrs, s_ptrs, x_ptrs, w_ok, s_ok, x_ok, w_ks, s_ks, x_ks, zq, sq, xq,
                                       j0 + jj, G, GK, EVEN)
                acc = _mma_step(acc, wb, s, xv, R, KS, 1, XSHIFT, NW)
        return gl.sum(acc, axis=0)

    @gluon.jit
    def _expert_columns(ids_ptr, e, N, K_ROUTE: gl.constexpr, KP: gl.constexpr, layout: gl.constexpr):
        """For the 8 MMA columns n (tokens): (pair n * K + k routed to expert e, whether token n has one), in
        `layout` (a 1-D layout of 8). ids: (N * K,) flat expert ids; a token's K ids are distinct."""
        NW: gl.constexpr = gl.num_warps()
        blk: gl.constexpr = gl.BlockedLayout([1, KP], [32, 1], [NW, 1], [1, 0])
        n = gl.arange(0, 8, layout=gl.SliceLayout(1, blk))
        k = gl.arange(0, KP, layout=gl.SliceLayout(0, blk))
        ids = gl.load(ids_ptr + n[:, None] * K_ROUTE + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K_ROUTE),
                      other=-1)
        hit = ids == e
        has = gl.max(hit.to(gl.int32), axis=1) > 0
        pair = n * K_ROUTE + gl.sum(gl.where(hit, k[None, :], 0), axis=1)
        return gl.convert_layout(pair, layout), gl.convert_layout(has, layout)

    @gluon.jit
    def _leader_expert(ids_ptr, i, M, MP: gl.constexpr):
        """(pair i is the first pair routed to its expert, that expert). ids: (M,) flat expert ids."""
        NW: gl.constexpr = gl.num_warps()
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        e = gl.load(ids_ptr + i)
        j = gl.arange(0, MP, layout=lay)
        ids = gl.load(ids_ptr + j, mask=j < M, other=-1)
        return gl.sum(((ids == e) & (j < i)).to(gl.int32), axis=0) == 0, e

    @gluon.jit
    def _mlp1_swiglu_mma_kernel(
        x_ptr,  # (N, H) fp16 activations in `mma_input` form
        ids_ptr,  # (M,) expert id of each pair (token * K + k)
        w_ptr,  # (E, 2I, H/32, 16) packed blocks
        s_ptr,  # (E, 2I, H/32) scales
        b_ptr,  # (E, 2I)
        act_ptr,  # (M, I) fp16 out, by pair, in `mma_input` form (mlp2's input)
        N, M, limit,
        H: gl.constexpr, I: gl.constexpr, K_ROUTE: gl.constexpr, KP: gl.constexpr, ACT_DTYPE: gl.constexpr,
        MP: gl.constexpr, R: gl.constexpr, KS: gl.constexpr, GS: gl.constexpr, XSHIFT: gl.constexpr, PDL: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        cl: gl.constexpr = _column_layout(KS, 1, NW)
        ol: gl.constexpr = _out_layout(KS, NW)
        # one thread holds a gate row and its linear row (2u, 2u + 1) for SwiGLU
        pl: gl.constexpr = gl.BlockedLayout([2, 1], [16, 2], [NW, 1], [0, 1])
        i = gl.program_id(0)
        j = gl.program_id(1)
        wait_for_prior_kernel(PDL)
        leader, e = _leader_expert(ids_ptr, i, M, MP)
        if leader:
            pair, has = _expert_columns(ids_ptr, e, N, K_ROUTE, KP, cl)
            row0 = e.to(gl.int64) * (2 * I) + j * R  # rows 2u gate, 2u + 1 linear
            acc = _mma_gemv_rows(w_ptr, s_ptr, row0, 2 * I - j * R, x_ptr, (pair // K_ROUTE).to(gl.int64), has, H, R,
                                 KS, GS, XSHIFT, NW)
            local = j * R + gl.arange(0, R, layout=gl.SliceLayout(1, ol))
            h = acc + gl.load(b_ptr + row0 + local - j * R, mask=local < 2 * I, other=0.0).to(gl.float32)[:, None]
            # (R, 8) -> (R/2, 2, 8) -> (R/2, 8, 2): gate and linear rows side by side in one thread
            glu, lin = gl.split(gl.permute(gl.reshape(gl.convert_layout(h, pl), [R // 2, 2, 8]), [0, 2, 1]))
            out = swiglu_rounded(glu, lin, limit, ACT_DTYPE)
            pair_o, has_o = _expert_columns(ids_ptr, e, N, K_ROUTE, KP, gl.SliceLayout(0, out.type.layout))
            units = j * (R // 2) + gl.arange(0, R // 2, layout=gl.SliceLayout(1, out.type.layout))
            gl.store(act_ptr + pair_o[None, :] * I + mma_input_column(units)[:, None],
                     (out * (2.0 ** -XSHIFT)).to(gl.float16), mask=has_o[None, :] & (units < I)[:, None])

    @gluon.jit
    def _mlp2_mma_kernel(
        act_ptr,  # (M, I) fp16, by pair, in `mma_input` form
        ids_ptr,  # (M,) expert id of each pair
        w_ptr,  # (E, H, I/32, 16) packed blocks
        s_ptr,  # (E, H, I/32) scales
        b_ptr,  # (E, H)
        y_ptr,  # (M, H) out: expert output (with its bias), by pair
        N, M,
        H: gl.constexpr, I: gl.constexpr, K_ROUTE: gl.constexpr, KP: gl.constexpr,
        MP: gl.constexpr, R: gl.constexpr, KS: gl.constexpr, GS: gl.constexpr, XSHIFT: gl.constexpr, PDL: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        cl: gl.constexpr = _column_layout(KS, 1, NW)
        ol: gl.constexpr = _out_layout(KS, NW)
        i = gl.program_id(0)
        j = gl.program_id(1)
        wait_for_prior_kernel(PDL)
        leader, e = _leader_expert(ids_ptr, i, M, MP)
        if leader:
            pair, has = _expert_columns(ids_ptr, e, N, K_ROUTE, KP, cl)
            acc = _mma_gemv_rows(w_ptr, s_ptr, e.to(gl.int64) * H + j * R, H - j * R, act_ptr, pair.to(gl.int64), has,
                                 I, R, KS, GS, XSHIFT, NW)
            hs = j * R + gl.arange(0, R, layout=gl.SliceLayout(1, ol))
            y = acc + gl.load(b_ptr + e.to(gl.int64) * H + hs, mask=hs < H, other=0.0).to(gl.float32)[:, None]
            pair_o, has_o = _expert_columns(ids_ptr, e, N, K_ROUTE, KP, gl.SliceLayout(0, ol))
            gl.store(y_ptr + pair_o[None, :] * H + hs[:, None], y.to(y_ptr.dtype.element_ty),
                     mask=has_o[None, :] & (hs < H)[:, None])

    _TUNED: dict = {}

    def _tuned(name: str):
        if name not in _TUNED:
            import triton

            kernel = {"mlp1": _mlp1_swiglu_mma_kernel, "mlp2": _mlp2_mma_kernel}[name]
            configs = [triton.Config({"R": r, "KS": ks, "GS": gs}, num_warps=w, num_stages=1)
                       for r, w, ks, gs in _CONFIGS]
            _TUNED[name] = triton.autotune(configs, key=["H", "I"], cache_results=True)(kernel)
        return _TUNED[name]




def mlp_mma_gemv(x_mma, ids, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit: float,
                 k_route: int, act_dtype, out_dtype, *, pdl: bool, config: dict | None = None) -> torch.Tensor:
    """Both expert matmuls of the decode MoE on the tensor cores: x_mma (N, H) activations (N <= 8) in `mma_input`
    form, ids (M,) flat expert ids (M = N * k_route) -> y (M, H) in out_dtype, each pair's expert output with its bias (the
    CUDA-core GEMV's contract, see `moe_triton`). act_dtype: a tl dtype, the SwiGLU's rounding (the model's dtype).
    config: {"R", "KS", "GS", "num_warps"} instead of autotuning."""
    N, H = x_mma.shape
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = ids.numel()
    if N > MAX_TOKENS:
        raise ValueError(f"the tensor-core GEMV serves at most {MAX_TOKENS} tokens, got {N}")
    act = torch.empty((M, I), dtype=torch.float16, device=x_mma.device)
    y = torch.empty((M, H), dtype=out_dtype, device=x_mma.device)
    common = dict(K_ROUTE=k_route, KP=triton.next_power_of_2(k_route), MP=triton.next_power_of_2(M), XSHIFT=XSHIFT,
                  PDL=pdl)
    if config is None:
        k1, k2, c = _tuned("mlp1"), _tuned("mlp2"), {}
    else:
        k1, k2 = _mlp1_swiglu_mma_kernel, _mlp2_mma_kernel
        c = {k: config[k] for k in ("R", "KS", "GS", "num_warps")}
    k1[lambda m: (M, triton.cdiv(2 * I, m["R"]))](
        x_mma, ids, mlp1_blocks, mlp1_scales, mlp1_bias, act, N, M, limit, H=H, I=I, ACT_DTYPE=act_dtype,
        launch_pdl=pdl, **common, **c)
    k2[lambda m: (M, triton.cdiv(H, m["R"]))](
        act, ids, mlp2_blocks, mlp2_scales, mlp2_bias, y, N, M, H=H, I=I, launch_pdl=pdl, **common, **c)
    return y
