"""The MoE grouped GEMM on the tensor cores with the FP4 decode in the MMA's own register layout (Gluon, mma.sync).

The Triton grouped GEMM (`moe_gemm_triton`) leaves the FP4 decode to Triton (a float32 decode, or
`tl.dot_scaled`), whose result moves through shared memory into the MMA's operand layout. Here the product is
computed as W @ x^T (weight rows are the MMA's M, tokens its N) and each lane decodes exactly the weights its A
fragment holds, from the bytes as the checkpoint stores them:

  * The input dimension is walked in steps of 4 blocks of 32 inputs. Lane (g, t) of a warp loads block 4q + t
    of rows g and g + 8 of each of its 16-row tiles, 16 bytes each in one load; MMA pair p (k = 32) takes word p
    of each lane's block (inputs 8p .. 8p+7 of it), which is the A operand of a bf16 MMA pair whose k-width is 8
    (Gluon's DotOperandLayout(0, mma, k_width=8)), lane t holding 8 of the 32 inputs.
  * FP4 -> bf16 in ~19 SASS instructions for 8 weights (`_FP4_TO_BF16`): each code's sign, exponent and mantissa bits
    are moved into a bf16 as sign | exponent field e | mantissa top bit m, which is the FP4 value times 2^-126
    (code 1 = 0.5 lands on the bf16 subnormal 2^-127); one bf16x2 multiply by 2^(s - 1) = 2^126 * 2^(s - 127)
    applies the block scale too. Exact: every product is a bf16 value (scale bytes up to MAX_SCALE_BYTE; `moe_triton`
    checks each scale tensor once and keeps the Triton GEMM for any other).
  * The decode pairs bytes (0, 2) and (1, 3) of the word, so a lane's 8 inputs come out in the order
    0, 4, 2, 6, 1, 5, 3, 7; the activations of the same 8 inputs, read as 8 consecutive bf16 a lane, are
    permuted in registers to that order (a few byte permutes, shared by all of the warp's row tiles). The MMA sums
    over k in any order.
  * A step's activations (T tokens x 128 inputs) are copied once for the whole CTA into shared memory by
    `cp.async`, two steps ahead (four buffers), and every warp reads its MMA operands from there; the packed
    weights go straight to registers, one step ahead, with an L2 prefetch hint two steps before that (at every
    other step: a 128-byte line holds two steps of a row).
  * Products and sums are fp32 in the tensor cores; the output is rounded as the Triton GEMM rounds it.

Grid, tiles and outputs are those of the Triton grouped GEMM (pairs sorted by expert, each program one block of
weight rows times one tile of an expert's sorted rows), so `moe_triton` calls these kernels in its place.
mlp1's tiles take the gate rows 2u in their first 8 rows of each 16 and the linear rows 2u + 1 in the next 8, so a
lane holds both halves of a SwiGLU unit.

Measured on the H200 (20b shapes, a layer call, CUDA-graph timed): faster than the CUDA-core GEMV from 2 tokens
(71.4 vs 77.0 us, scripts/moe_crossover.py) and than the Triton GEMM (autotuned) up to 512 tokens. Fixed tiles
(R rows, T tokens, warps; timed as `scripts/moe_tiles.py --kernel mma` times them) against that GEMM: 64 tokens
201.2 us (128, 16, 4) vs 259.9; 256: 361.8 (128, 32, 4) vs 438.6; 512: 609.7 (128, 32, 4) vs 653.9; 1024: 1032.4
(128, 64, 4) vs 1017.2. The form before, each warp loading the activations itself through L1, took 203.2, 424.0
and 1444.7 us with the same tiles at 64, 256 and 1024 tokens. So `moe_triton` runs it for 2-512 tokens (batched
decode, short prefills).

Needs Gluon (`triton.experimental.gluon`, Triton 3.6's API) and sm_80+; `mma_gemm_available` says whether this
path serves, and `moe_triton` falls back to the Triton GEMM otherwise.
"""

from __future__ import annotations

import os

import torch

from gptoss.kernels import cuda_capability, scratch

try:  # Gluon's API is experimental: any mismatch disables this path, never the package
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    from gptoss.kernels.moe_elementwise import swiglu_rounded

    # names that changed after Triton 3.6 (the GPU machine's): the CTA barrier (barrier) and cp.async (async_load)
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _copy_to_shared = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False

# The largest E8M0 scale byte whose multiplier 2^(s - 1) is a finite bf16 (weights up to 12 in magnitude).
MAX_SCALE_BYTE = 128
# Steps of 128 inputs whose weight bytes a program hints into L2 (`prefetch.global.L2`, one instruction a row and
# step, no register) ahead of the loads that take them into registers one step ahead: the DRAM reads start two
# steps earlier. scripts/moe_crossover.py on an H100, us a layer call at 1 / 32 / 64 tokens, with 0, 2 and 4 steps:
# 48.2 / 250.6 / 248.8, 43.7 / 236.8 / 243.5, 45.1 / 251.1 / 257.4 (one run each; further ahead, the lines in
# flight of all resident programs crowd L2). GPTOSS_PREFETCH=0 turns it off. The hints go out every other step: a
# step is 64 bytes of a row and a 128-byte line holds two, so hinting each step hinted most lines twice, and the
# hints load the L2, the busiest unit here (Nsight Compute). H100, us a layer call, every other step against every
# step (two rounds each, one process; the autotuned tiles): 16 tokens 191 vs 210, 32: 198 vs 220, 128: 262 vs 264,
# 256: 359 vs 364, 512: 603 vs 616; 64 (128-row 16-token 4-warp tiles): 209 vs 230.
PREFETCH_STEPS = 2


def mma_gemm_available(x: torch.Tensor) -> bool:
    """Whether these kernels can serve x's device: Gluon importable, sm_80+, bf16 activations, not turned off with
    GPTOSS_MOE_GEMM=triton."""
    return (HAS_GLUON and x.is_cuda and x.dtype == torch.bfloat16
            and os.environ.get("GPTOSS_MOE_GEMM", "mma") != "triton"
            and cuda_capability(x) >= (8, 0))


if HAS_GLUON:
    # One 32-bit word $4 (4 packed bytes, 8 FP4 codes; $5 .. $11 repeat it) and the block's bf16 multiplier
    # 2^(s - 1) (both halves of $12; $13 .. $15 repeat it)
    # -> 4 bf16x2 registers: $0 = low nibbles of bytes 0 and 2, $1 = low nibbles of bytes 1 and 3, $2 / $3 the
    # high nibbles likewise. Each nibble's 3 magnitude bits go to bf16 bits 6..8 (16 bits apart for the pair: one
    # shift serves both halves), its sign bit to bit 15. The multiply is an fma with -0 added (z): the same product
    # for every input, and it builds for sm_80, where mul.bf16x2 does not exist (ptxas makes it HMUL2 on sm_90).
    _FP4_TO_BF16 = gl.constexpr("""{
    .reg .b32 m, s, z;
    mov.b32 z, 0x80008000;
    shl.b32 m, $4, 6;
    and.b32 m, m, 0x01C001C0;
    shl.b32 s, $4, 12;
    and.b32 s, s, 0x80008000;
    or.b32 m, m, s;
    fma.rn.bf16x2 $0, m, $12, z;
    shr.b32 m, $4, 2;
    and.b32 m, m, 0x01C001C0;
    shl.b32 s, $4, 4;
    and.b32 s, s, 0x80008000;
    or.b32 m, m, s;
    fma.rn.bf16x2 $1, m, $12, z;
    shl.b32 m, $4, 2;
    and.b32 m, m, 0x01C001C0;
    shl.b32 s, $4, 8;
    and.b32 s, s, 0x80008000;
    or.b32 m, m, s;
    fma.rn.bf16x2 $2, m, $12, z;
    shr.b32 m, $4, 6;
    and.b32 m, m, 0x01C001C0;
    and.b32 s, $4, 0x80008000;
    or.b32 m, m, s;
    fma.rn.bf16x2 $3, m, $12, z;
    }""")

    @gluon.constexpr_function
    def _log2(n):
        return n.bit_length() - 1

    @gluon.constexpr_function
    def _min(a, b):
        return min(a, b)

    @gluon.constexpr_function
    def _acc_layout(nw):
        """(R, T) accumulators: the warps split the rows (16-row tiles, round robin), each warp holds all T tokens."""
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])

    @gluon.constexpr_function
    def _words_layout(r, nw):
        """(R, 4, 8) the packed words of one MMA pair, each repeated 8 times (the 8 weights it decodes to): lane
        (g, t) holds its word of rows g and g + 8 of each 16-row tile of its warp (warp w has tiles w, w + NW, ...),
        as the A fragments want them; the last dimension is a broadcast in registers."""
        reps = [[16 * nw << m, 0, 0] for m in range(_log2(r // (16 * nw)))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]] + reps,
                                          lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                          warp_bases=[[16 << w, 0, 0] for w in range(_log2(nw))], block_bases=[],
                                          shape=[r, 4, 8])

    @gluon.constexpr_function
    def _acts_layout(t, nw):
        """(T, 32) activations of one MMA pair: lane (g, t) holds columns 8t .. 8t+7 (registers: the 8 inputs its
        word decodes to) of tokens g, g + 8, ...; every warp holds the same (the B fragments of all its row
        tiles)."""
        reps = [[8 << n, 0] for n in range(_log2(t // 8))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4]] + reps,
                                          lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=[[0, 0] for _ in range(_log2(nw))], block_bases=[],
                                          shape=[t, 32])

    @gluon.jit
    def _tile(seg_ptr, t, E, EP: gl.constexpr, BM: gl.constexpr):
        """-> (expert or >= E if tile t is unused, first sorted row, end sorted row) of row tile t, as
        `moe_gemm_triton._tile` numbers them: each expert's rows split into BM-row tiles, expert by expert."""
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        ei = gl.arange(0, EP, layout=lay)
        em = ei < E
        end = gl.load(seg_ptr + ei, mask=em, other=0)
        start = gl.load(seg_ptr + ei - 1, mask=em & (ei > 0), other=0)
        nt = (end - start + BM - 1) // BM
        t_end = gl.associative_scan(nt, 0, _add)
        e = gl.sum((t_end <= t).to(gl.int32), 0)
        sel = ei == e
        row0 = gl.sum(gl.where(sel, start + (t - (t_end - nt)) * BM, 0), 0)
        row_end = gl.sum(gl.where(sel, end, 0), 0)
        return e, row0, row_end

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _multiplier(s):
        """Scale bytes -> the bf16 2^(s - 1) that turns decoded codes (FP4 value * 2^-126) into weights."""
        return ((s.to(gl.int32) + 126) << 7).to(gl.int16).to(gl.bfloat16, bitcast=True)

    @gluon.jit
    def _mma_pair(acc, wd, mult, xv, NW: gl.constexpr):
        """acc (R, T) += W (R, 32) @ x (T, 32)^T for one MMA pair on the tensor cores (see the module docstring):
        wd (R, 4) the packed word each lane t holds, mult (R, 4) its multiplier (`_multiplier`), xv (T, 32) the
        activations of the same inputs (column 8t + j for input j of lane t's word)."""
        R: gl.constexpr = wd.shape[0]
        T: gl.constexpr = xv.shape[0]
        mma: gl.constexpr = _acc_layout(NW)
        wl: gl.constexpr = _words_layout(R, NW)
        a_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b_dot: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        shape: gl.constexpr = [R, 4, 8]
        wd = gl.convert_layout(wd, gl.SliceLayout(2, wl), assert_trivial=True)
        mult = gl.convert_layout(mult, gl.SliceLayout(2, wl), assert_trivial=True)
        wd8 = gl.broadcast(wd[:, :, None], gl.full(shape, 0, gl.int32, wl))[0]
        mult8 = gl.broadcast(mult[:, :, None], gl.full(shape, 0, gl.bfloat16, wl))[0]
        w = gl.inline_asm_elementwise(_FP4_TO_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [wd8, mult8],
                                      dtype=gl.bfloat16, is_pure=True, pack=8)
        # w[r, t, i] holds input 8t + pi(i), pi = (0, 4, 2, 6, 1, 5, 3, 7) (bit-reversed i): the MMA's k' = 8t + i
        a = gl.reshape(w, [R, 32])
        # activations (T, 32) = (T, 4 t, 2 c2, 2 c1, 2 c0) for input 8t + 4 c2 + 2 c1 + c0 -> k' = 8t + 4 c0 + ...
        b = gl.reshape(gl.permute(gl.reshape(xv, [T, 4, 2, 2, 2]), [0, 1, 4, 3, 2]), [T, 32])
        return mma_v2(gl.convert_layout(a, a_dot), gl.convert_layout(gl.permute(b, [1, 0]), b_dot), acc)

    @gluon.constexpr_function
    def _step_layout(r, nw):
        """(R, 4, 4) packed words of a 4-block step: lane (g, t) holds block t's 4 words (16 contiguous bytes,
        registers) of rows g and g + 8 of each 16-row tile of its warp; word p is the A operand of MMA pair p."""
        reps = [[16 * nw << m, 0, 0] for m in range(_log2(r // (16 * nw)))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [0, 0, 2], [8, 0, 0]] + reps,
                                          lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                          warp_bases=[[16 << w, 0, 0] for w in range(_log2(nw))], block_bases=[],
                                          shape=[r, 4, 4])

    @gluon.jit
    def _split4(v):
        """v (..., 4) with the last dimension in registers -> its 4 slices in order."""
        even, odd = gl.split(gl.reshape(v, v.shape[:-1] + [2, 2]))  # index 2a + b: even holds b = 0 (0, 2)
        v0, v2 = gl.split(even)
        v1, v3 = gl.split(odd)
        return v0, v1, v2, v3

    @gluon.jit
    def _load_mult(s_ptrs, t4, q, G: gl.constexpr):
        """Step q's multipliers (R, 4 t) (block 4q + t); blocks past the last get 0."""
        blk = 4 * q + t4  # (1, 4)
        return gl.where(blk < G, _multiplier(gl.load(s_ptrs + gl.minimum(blk, G - 1))), 0.0).to(gl.bfloat16)

    @gluon.jit
    def _load_step(w_ptrs, s_ptrs, t4, q, G: gl.constexpr):
        """Step q's packed words (R, 4 t, 4 p) (block 4q + t, word p) and multipliers (R, 4 t); blocks past the
        last read the last one with multiplier 0."""
        wd = gl.load(w_ptrs + gl.minimum(4 * q + t4, G - 1)[:, :, None] * 4)
        return wd, _load_mult(s_ptrs, t4, q, G)

    @gluon.jit
    def _prefetch_l2(ptrs):
        """Hints L2 to fetch the line holding each address of ptrs (which must be valid); returns nothing."""
        gl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.constexpr_function
    def _copy_layout(nw):
        """(T, 128) activation tiles as copied to shared memory: 16 bytes a thread, 16 threads a 256-byte row."""
        return gl.BlockedLayout([1, 8], [2, 16], [nw, 1], [1, 0])

    @gluon.constexpr_function
    def _staged_layout(t, nw):
        """(T, 128) a step's activations as each warp reads them from shared memory: lane (g, t) holds columns
        32t .. 32t+31 (its block of the step) of tokens g, g + 8, ...; every warp holds the same."""
        reps = [[8 << n, 0] for n in range(_log2(t // 8))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]] + reps,
                                          lane_bases=[[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=[[0, 0] for _ in range(_log2(nw))], block_bases=[],
                                          shape=[t, 128])

    @gluon.jit
    def _shared_pairs(buf, NW: gl.constexpr):
        """A step's activations (T, 128) in shared memory -> the (T, 32) activations of MMA pairs 0 .. 3 in
        `_acts_layout` (pair p, column 8t + j: input 32t + 8p + j of the step)."""
        T: gl.constexpr = buf.shape[0]
        xv = buf.load(_staged_layout(T, NW))
        # (T, 128) = (T, 4 t, 4 p, 8 j) -> (T, 4 t, 8 j, 4 p): the pair index in registers, last
        x0, x1, x2, x3 = _split4(gl.permute(gl.reshape(xv, [T, 4, 4, 8]), [0, 1, 3, 2]))
        xl: gl.constexpr = _acts_layout(T, NW)
        return (gl.convert_layout(gl.reshape(x0, [T, 32]), xl, assert_trivial=True),
                gl.convert_layout(gl.reshape(x1, [T, 32]), xl, assert_trivial=True),
                gl.convert_layout(gl.reshape(x2, [T, 32]), xl, assert_trivial=True),
                gl.convert_layout(gl.reshape(x3, [T, 32]), xl, assert_trivial=True))

    @gluon.jit
    def _copy_step(buf, x_ptrs, kc, live, q, NQ: gl.constexpr, G: gl.constexpr):
        """Starts the copy of step q's activations (T, 128) into buf (`cp.async`, one commit group; steps past the
        last copy the last): column c is input 32 * min(4q + c // 32, G - 1) + c % 32; rows not live are zero-filled."""
        _copy_to_shared(buf, x_ptrs + gl.minimum(4 * gl.minimum(q, NQ - 1) + kc // 32, G - 1) * 32, mask=live)
        async_copy.commit_group()

    @gluon.jit
    def _gemm_step(q, acc, wd, mult, buf, buf_ahead, w_ptrs, s_ptrs, t4, row_ptrs, x_ptrs, kc, live,
                   G: gl.constexpr, NQ: gl.constexpr, NW: gl.constexpr, AHEAD: gl.constexpr, HINT: gl.constexpr):
        """Step q of `_gemm_rows`: wait for its activations (buf), copy step q + 2's into buf_ahead, hint step
        q + AHEAD's weights into L2 if HINT, load step q + 1's weights, run the step's four MMA pairs with step
        q's (wd, mult). -> (acc, step q + 1's words and multipliers)."""
        async_copy.wait_group(1)  # this thread's copies of step q have landed
        _cta_barrier()  # and every thread's; buf_ahead was last read at step q - 2, before the previous barrier
        _copy_step(buf_ahead, x_ptrs, kc, live, q + 2, NQ, G)
        if AHEAD > 0 and HINT:
            _prefetch_l2(row_ptrs + gl.minimum(q + AHEAD, NQ - 1) * 16)
        wd_n, mult_n = _load_step(w_ptrs, s_ptrs, t4, q + 1, G)
        x0, x1, x2, x3 = _shared_pairs(buf, NW)
        w0, w1, w2, w3 = _split4(wd)
        acc = _mma_pair(acc, w0, mult, x0, NW)
        acc = _mma_pair(acc, w1, mult, x1, NW)
        acc = _mma_pair(acc, w2, mult, x2, NW)
        acc = _mma_pair(acc, w3, mult, x3, NW)
        return acc, wd_n, mult_n

    @gluon.jit
    def _gemm_rows(w_ptr, s_ptr, wrow, x_ptr, xrow, xlive, KDIM: gl.constexpr, T: gl.constexpr, NW: gl.constexpr,
                   AHEAD: gl.constexpr):
        """sum_k W[wrow[r], k] * X[xrow[n], k] -> (R, T) float32 in `_acc_layout`, for packed rows wrow (R,)
        int64 of a (., KDIM) MXFP4 matrix (w_ptr: its int32 words) and activation rows xrow (T,) int64 of a
        (., KDIM) bf16 matrix. Every row index must be valid (callers point unused rows at a real one and drop
        their results); rows where xlive (T,) is false are not read (zero-filled). wrow in `_row_layout`, xrow and
        xlive in SliceLayout(1, `_copy_layout`).

        Steps of 4 blocks (128 inputs) in which lane t owns block 4q + t of each of its rows: its 16 bytes come in
        one 16-byte load, one step ahead of its MMAs, and MMA pair p takes word p of each lane's block. A step's
        activations (T, 128) are copied once for all of the CTA's warps into shared memory by `cp.async`, two
        steps ahead, into four buffers (separate allocations in a fixed rotation, the loop unrolled by four, so
        that the compiler's hazard analysis adds no barrier of its own), and each warp reads the pairs it needs
        from there (`_shared_pairs`). Before, every warp loaded them from global memory through L1, a step ahead:
        the copy halves the L1 traffic (Nsight Compute, mlp1 at 64 tokens) and is faster at every size measured
        (module docstring). Blocks past the last (G not a multiple of 4) read the last one's bytes and
        activations with multiplier 0. With AHEAD > 0 the weights of step q + AHEAD are hinted into L2 at each
        even step q (PREFETCH_STEPS), the scales all at the start."""
        R: gl.constexpr = wrow.shape[0]
        sl: gl.constexpr = _step_layout(R, NW)
        wl: gl.constexpr = gl.SliceLayout(2, sl)
        G: gl.constexpr = KDIM // 32
        NQ: gl.constexpr = (G + 3) // 4
        t4 = gl.arange(0, 4, layout=gl.SliceLayout(0, wl))[None, :]
        pw = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, sl)))
        wr = gl.convert_layout(wrow, gl.SliceLayout(1, wl))
        w_ptrs = w_ptr + wr[:, None, None] * (KDIM // 8) + pw[None, None, :]
        s_ptrs = s_ptr + wr[:, None] * G
        row_ptrs = w_ptr + wr * (KDIM // 8)
        kc = gl.arange(0, 128, layout=gl.SliceLayout(0, _copy_layout(NW)))[None, :]  # (1, 128)
        x_ptrs = x_ptr + xrow[:, None] * KDIM + kc % 32  # (T, 128): column c's input within its block
        live = gl.broadcast(xlive[:, None], kc)[0]
        sh: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
        bufs = (gl.allocate_shared_memory(gl.bfloat16, [T, 128], sh),
                gl.allocate_shared_memory(gl.bfloat16, [T, 128], sh),
                gl.allocate_shared_memory(gl.bfloat16, [T, 128], sh),
                gl.allocate_shared_memory(gl.bfloat16, [T, 128], sh))
        for i in gl.static_range(2):
            _copy_step(bufs[i], x_ptrs, kc, live, i, NQ, G)
        if AHEAD > 0:
            _prefetch_l2(s_ptrs)
            _prefetch_l2(s_ptrs + (G - 1))
            for q in gl.static_range(0, _min(AHEAD, NQ), 2):  # never past a row's last step (may be invalid)
                _prefetch_l2(row_ptrs + q * 16)
        wd, mult = _load_step(w_ptrs, s_ptrs, t4, 0, G)
        acc = gl.zeros([R, T], gl.float32, _acc_layout(NW))
        for q in range(0, NQ - 3, 4):
            for i in gl.static_range(4):
                acc, wd, mult = _gemm_step(q + i, acc, wd, mult, bufs[i], bufs[(i + 2) % 4], w_ptrs, s_ptrs, t4,
                                           row_ptrs, x_ptrs, kc, live, G, NQ, NW, AHEAD, i % 2 == 0)
        for i in gl.static_range(NQ % 4):  # the steps after the last whole rotation, in the same rotation
            acc, wd, mult = _gemm_step(NQ - NQ % 4 + i, acc, wd, mult, bufs[i], bufs[(i + 2) % 4], w_ptrs, s_ptrs,
                                       t4, row_ptrs, x_ptrs, kc, live, G, NQ, NW, AHEAD, i % 2 == 0)
        async_copy.wait_group(0)
        return acc

    @gluon.constexpr_function
    def _row_layout(r, nw):
        """Layout of the (R,) weight row indices `_gemm_rows` takes."""
        return gl.SliceLayout(1, gl.SliceLayout(2, _words_layout(r, nw)))

    @gluon.jit
    def _mlp1_swiglu_mma_kernel(
        x_ptr,  # (N, H) bf16
        order_ptr,  # (M,) int32 sorted row -> pair
        seg_ptr,  # (E,) int32 end sorted row of each expert
        E,
        w_ptr,  # (E, 2I, H/32, 4) int32 view of the packed blocks
        s_ptr,  # (E, 2I, H/32) uint8
        b_ptr,  # (E, 2I)
        act_ptr,  # (M, I) bf16 out, sorted rows
        limit,
        tune_m,  # M rounded to a power of two: autotuning key only
        H: gl.constexpr, I: gl.constexpr, K_ROUTE: gl.constexpr, EP: gl.constexpr,
        R: gl.constexpr,  # weight rows per program (R / 2 SwiGLU units)
        T: gl.constexpr,  # sorted rows (tokens) per tile
        AHEAD: gl.constexpr,  # steps of weights prefetched into L2 ahead of the loads (0: none)
    ):
        NW: gl.constexpr = gl.num_warps()
        xl: gl.constexpr = _copy_layout(NW)
        j = gl.program_id(0)
        e, start, end = _tile(seg_ptr, gl.program_id(1), E, EP, T)
        if e < E:
            # rows past the tile's end point at its last row, are not read (zero-filled) and not stored
            srow = start + gl.arange(0, T, layout=gl.SliceLayout(1, xl))
            rows = gl.minimum(srow, end - 1)
            tok = (gl.load(order_ptr + rows) // K_ROUTE).to(gl.int64)
            # tile row r: unit j * R/2 + (r // 16) * 8 + r % 8, gate (row 2u) in r % 16 < 8, linear (2u + 1) above;
            # units past I read unit I - 1
            r = gl.arange(0, R, layout=_row_layout(R, NW))
            unit = gl.minimum(j * (R // 2) + (r // 16) * 8 + r % 8, I - 1)
            wrow = e.to(gl.int64) * (2 * I) + 2 * unit + (r // 8) % 2
            acc = _gemm_rows(w_ptr, s_ptr, wrow, x_ptr, tok, srow < end, H, T, NW, AHEAD)  # (R, T)
            out, ts, us = _mlp1_outputs(acc, e, j, start, b_ptr, limit, I)
            gl.store(act_ptr + ts.to(gl.int64)[:, None] * I + us[None, :], out,
                     mask=(ts < end)[:, None] & (us < I)[None, :])

    @gluon.jit
    def _mlp1_outputs(acc, e, j, start, b_ptr, limit, I: gl.constexpr):
        """mlp1's products (R, T) of block j of expert e's weight rows (rows ordered as `_mlp1_swiglu_mma_kernel`
        takes them) for the tile's sorted rows from `start` -> (SwiGLU units (T, R/2) bf16, sorted rows (T,), unit
        indices (R/2,)) in a layout with a program's units contiguous; units past I hold junk."""
        R: gl.constexpr = acc.shape[0]
        T: gl.constexpr = acc.shape[1]
        NW: gl.constexpr = gl.num_warps()
        ro = gl.arange(0, R, layout=gl.SliceLayout(1, acc.type.layout))
        uo = j * (R // 2) + (ro // 16) * 8 + ro % 8
        bias = gl.load(b_ptr + e.to(gl.int64) * (2 * I) + 2 * uo + (ro // 8) % 2, mask=uo < I, other=0.0)
        h = acc + bias.to(gl.float32)[:, None]
        # (R, T) = (R/16 tiles, 2 gate|linear, 8, T) -> (R/16, 8, T, 2): a unit's two rows in one lane
        glu, lin = gl.split(gl.permute(gl.reshape(h, [R // 16, 2, 8, T]), [0, 2, 3, 1]))
        out = swiglu_rounded(gl.reshape(glu, [R // 2, T]), gl.reshape(lin, [R // 2, T]), limit, gl.bfloat16)
        st: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (R // 16), R // 16], [NW, 1], [1, 0])
        out = gl.convert_layout(gl.permute(out, [1, 0]), st)  # (T, R/2), units contiguous
        ts = start + gl.arange(0, T, layout=gl.SliceLayout(1, st))
        us = j * (R // 2) + gl.arange(0, R // 2, layout=gl.SliceLayout(0, st))
        return out.to(gl.bfloat16), ts, us

    @gluon.jit
    def _mlp2_mma_kernel(
        act_ptr,  # (M, I) bf16 sorted rows
        order_ptr,  # (M,) int32
        seg_ptr,  # (E,) int32
        E,
        w_ptr,  # (E, H, I/32, 4) int32 view of the packed blocks
        s_ptr,  # (E, H, I/32) uint8
        b_ptr,  # (E, H)
        y_ptr,  # (M, H) out, original pair order
        tune_m,
        H: gl.constexpr, I: gl.constexpr, EP: gl.constexpr,
        R: gl.constexpr,  # output features per program
        T: gl.constexpr,
        AHEAD: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        xl: gl.constexpr = _copy_layout(NW)
        j = gl.program_id(0)
        e, start, end = _tile(seg_ptr, gl.program_id(1), E, EP, T)
        if e < E:
            srow = start + gl.arange(0, T, layout=gl.SliceLayout(1, xl))
            rows = gl.minimum(srow, end - 1)
            hs = gl.minimum(j * R + gl.arange(0, R, layout=_row_layout(R, NW)), H - 1)
            wrow = e.to(gl.int64) * H + hs
            acc = _gemm_rows(w_ptr, s_ptr, wrow, act_ptr, rows.to(gl.int64), srow < end, I, T, NW, AHEAD)
            _mlp2_store(acc, e, j, start, end, order_ptr, b_ptr, y_ptr, H)

    @gluon.jit
    def _mlp2_store(acc, e, j, start, end, order_ptr, b_ptr, y_ptr, H: gl.constexpr):
        """mlp2's products (R, T) of output features j * R .. of expert e for the tile's sorted rows start .. end
        -> y rows of their pairs, with the bias, rounded to y's dtype."""
        R: gl.constexpr = acc.shape[0]
        T: gl.constexpr = acc.shape[1]
        ho = j * R + gl.arange(0, R, layout=gl.SliceLayout(1, acc.type.layout))
        bias = gl.load(b_ptr + e.to(gl.int64) * H + ho, mask=ho < H, other=0.0)
        y = acc + bias.to(gl.float32)[:, None]
        st: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        y = gl.convert_layout(gl.permute(y, [1, 0]), st)  # (T, R), features contiguous
        ts = start + gl.arange(0, T, layout=gl.SliceLayout(1, st))
        tm = ts < end
        pair = gl.load(order_ptr + ts, mask=tm, other=0).to(gl.int64)
        hs_o = j * R + gl.arange(0, R, layout=gl.SliceLayout(0, st))
        gl.store(y_ptr + pair[:, None] * H + hs_o[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=tm[:, None] & (hs_o < H)[None, :])

    # (R, T, warps) candidates, autotuned per (shapes, E, M bucket) on the first call
    _CONFIGS = [(128, 64, 4), (256, 64, 8), (128, 32, 4), (64, 64, 4), (128, 16, 4), (64, 16, 4), (256, 32, 8),
                (64, 32, 4), (64, 8, 4), (128, 8, 4), (256, 16, 8)]

    _TUNED: dict = {}


def kernel_pair(kernels: tuple, candidates: list, config: dict | None, tuned: dict) -> tuple:
    """(mlp1 kernel, mlp2 kernel, launch options) of a tile-parametrized (R, T) kernel pair: autotuned over the
    candidates (R, T, warps) per (shapes, E, M bucket) on the first call, the tuned pair kept in `tuned`; or with
    a fixed config {"R", "T", "num_warps"} the plain kernels and that config."""
    if config is not None:
        return (*kernels, {"R": config["R"], "T": config["T"], "num_warps": config["num_warps"]})
    if "pair" not in tuned:
        configs = [triton.Config({"R": r, "T": t}, num_warps=w, num_stages=1) for r, t, w in candidates]
        tuned["pair"] = tuple(triton.autotune(configs, key=["H", "I", "E", "tune_m"], cache_results=True)(k)
                              for k in kernels)
    return (*tuned["pair"], {})


def mlp_mma_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                 limit: float, k_route: int, *, config: dict | None = None) -> torch.Tensor:
    """Both expert matmuls of the MoE for pairs sorted by expert: x (N, H) bf16, order (M,) int32 sorted row -> pair,
    seg_end (E,) int32 end sorted row of each expert -> y (M, H) bf16, each pair's expert output with its bias
    (`moe_triton`'s grouped-GEMM contract). config: {"R", "T", "num_warps"} instead of autotuning."""

    N, H = x.shape
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = order.numel()
    act = scratch((M, I), torch.bfloat16, x.device)
    y = scratch((M, H), torch.bfloat16, x.device)
    EP = triton.next_power_of_2(E)
    tune_m = max(64, triton.next_power_of_2(M))
    n_tiles = lambda t: -(-M // t) + min(E, M)  # noqa: E731 - bound on the tiles of any routing
    k1, k2, opts = kernel_pair((_mlp1_swiglu_mma_kernel, _mlp2_mma_kernel), _CONFIGS, config, _TUNED)
    opts["AHEAD"] = PREFETCH_STEPS if os.environ.get("GPTOSS_PREFETCH", "1") != "0" else 0
    k1[lambda m: (triton.cdiv(2 * I, m["R"]), n_tiles(m["T"]))](
        x, order, seg_end, E, mlp1_blocks.view(torch.int32), mlp1_scales, mlp1_bias, act, limit, tune_m, H=H, I=I,
        K_ROUTE=k_route, EP=EP, **opts)
    k2[lambda m: (triton.cdiv(H, m["R"]), n_tiles(m["T"]))](
        act, order, seg_end, E, mlp2_blocks.view(torch.int32), mlp2_scales, mlp2_bias, y, tune_m, H=H, I=I, EP=EP,
        **opts)
    return y
