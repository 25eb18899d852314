"""The MoE grouped GEMM for prefills on Hopper: warpgroup MMAs (wgmma) fed by the FP4 decode in registers (Gluon).

`gptoss.kernels.moe_mma` decodes the packed weights straight into `mma.sync`'s A fragments; this module does the same
for sm_90's asynchronous warpgroup MMA, whose A operand may also come from registers, and stages the activations
(its B operand) in shared memory, where one copy serves every warp of the CTA. The product is W @ x^T: an expert's
weight rows are the MMA's M (64 a warpgroup), its tokens the MMA's N (T a tile), the input dimension its K.

  * Steps of 4 blocks of 32 inputs (128): lane (g, t) of a warp loads block 4q + t of its rows g and g + 8 (16
    bytes each, one load), as in moe_mma, and decodes them with the same FP4 -> bf16 asm (`_FP4_TO_BF16`, block
    scale included). Word j of a lane's block gives 4 bf16x2 registers: the pairs of inputs (0, 4), (2, 6), (1, 5),
    (3, 7) of its 8. wgmma's register A layout (bf16, k_width 2) holds, for lane t and k-step s of 16, the inputs
    16s + 2t + {0, 1} and 16s + 2t + {8, 9}; so the MMA's k is a permutation of the step's inputs:
        MMA k = 32 j + 16 i2 + 8 i1 + 2 t + i0   <->   input 32 t + 8 j + 4 i0 + 2 i1 + i2
    for lane t, word j, decoded element i = 4 i2 + 2 i1 + i0. The MMA sums over k in any order; the activations
    come in the same permuted order (`_mma_columns`), so each product pairs a weight with its own activation:
    mlp1's input, each token's row, is permuted by a small kernel first (`_permute_kernel`), and mlp1 copies a
    sorted row's token row from there; mlp1 writes its SwiGLU output, mlp2's input, permuted. Both are padded
    with zeros to a multiple of 128.
  * Activation tiles (the rows of a tile's T sorted pairs x 128 inputs, bf16: mlp1 reads each pair's token row, mlp2
    the pair's own row, each contiguous) are copied to shared memory by `cp.async` two steps ahead into four
    buffers; after a wait, a CTA barrier and a fence for the async proxy every warpgroup's wgmma reads the tile. The
    MMAs run asynchronously, one step behind: a warpgroup decodes step q's weights while its MMA of step q - 1 runs,
    and retires that MMA after issuing step q's. The packed weights are copied to shared memory by `cp.async` too,
    three steps ahead, in the activations' commit groups, and each thread reads its own words back just before
    decoding them; their block multipliers are loaded into registers two steps ahead. Loading the words straight
    into registers two steps ahead, as moe_mma does, was 7-25% slower on an H100 over the tiles and sizes in
    docs/performance.md (a 20b layer call at 1,024 tokens, tile 128 x 128: 957 against 861 us).
  * Blocks past the last (KDIM / 32 not a multiple of 4) read the last block with multiplier 0, against zero
    activations.

Grid: (row tile, block of weight rows), tiles fastest: the CTAs in flight share one block of an expert's weights
through L2, each with one of its token tiles, so each weight byte comes from memory about once per call. Tiles and
outputs are those of the Triton grouped GEMM (`moe_gemm_triton`: pairs sorted by expert, `_tile` numbering), so
`moe_triton` calls these kernels in its place. Numerics: exact bf16 weights (scale bytes up to
moe_mma.MAX_SCALE_BYTE), fp32 products and sums on the tensor cores, outputs rounded as the other GEMMs round them.

Needs Gluon's Hopper API (Triton 3.6) and an sm_90 GPU; `wgmma_gemm_available` says whether this path serves.
`moe_triton` runs it on sm_90 between MMA_MAX_TOKENS and the dense GEMM's threshold: a 20b layer call on an H100
(`scripts/moe_crossover.py`) 619 against 755 us for the Triton GEMM at 768 tokens, 876 against 982 at 1,024,
1,562 against 1,762 at 2,048; GPTOSS_MOE_GEMM=triton turns it off.
"""

from __future__ import annotations

import os

import torch

from gptoss.kernels import cuda_capability, scratch

try:  # Gluon's API is experimental: any mismatch disables this path, never the package
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from gptoss.kernels.moe_mma import (_FP4_TO_BF16, _copy_layout, _copy_to_shared, _cta_barrier, _load_mult,
                                        _log2, _mlp1_outputs, _mlp2_store, _step_layout, _tile, kernel_pair)

    HAS_WGMMA = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAS_WGMMA = False


# wgmma exists on sm_90 only: elsewhere moe_triton runs the Triton GEMM in this module's place
HOPPER_ONLY = True


def wgmma_gemm_available(x: torch.Tensor) -> bool:
    """Whether these kernels can serve x's device: Gluon's Hopper API importable, an sm_90 GPU, bf16 activations,
    and not turned off with GPTOSS_MOE_GEMM=triton."""
    return (HAS_WGMMA and x.is_cuda and x.dtype == torch.bfloat16
            and os.environ.get("GPTOSS_MOE_GEMM", "mma") != "triton"
            and cuda_capability(x)[0] == 9)


if HAS_WGMMA:

    @gluon.constexpr_function
    def _acc_layout(nw, t):
        """(R, T) accumulators: warpgroups stacked over the rows (64 each), T tokens the MMA's N."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, t, 16])

    @gluon.constexpr_function
    def _a_layout(nw, t):
        """(R, 128) a step's decoded weights as wgmma's register A operand (bf16: k-width 2)."""
        return gl.DotOperandLayout(operand_index=0, parent=_acc_layout(nw, t), k_width=2)

    @gluon.constexpr_function
    def _acts_shared_layout():
        return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    @gluon.constexpr_function
    def _decode_layout(r, nw):
        """(R, 4 t, 4 j, 8) a step's packed words, each repeated 8 times (the 8 weights it decodes to): dropping the
        last dimension gives moe_mma's `_step_layout` (lane (g, t) holds block t's 4 words of its rows g, g + 8)."""
        reps = [[16 * nw << m, 0, 0, 0] for m in range(_log2(r // (16 * nw)))]
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [0, 0, 1, 0], [0, 0, 2, 0], [8, 0, 0, 0]] + reps,
            lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
            warp_bases=[[16 << w, 0, 0, 0] for w in range(_log2(nw))], block_bases=[], shape=[r, 4, 4, 8])

    @gluon.jit
    def _decode_step(wd, mult, NW: gl.constexpr, T: gl.constexpr):
        """Packed words (R, 4 t, 4 j) in `_step_layout` and multipliers (R, 4 t) (`_multiplier`) of a step -> the
        wgmma A operand (R, 128) bf16, its k in the permuted order of the module docstring."""
        R: gl.constexpr = wd.shape[0]
        dl: gl.constexpr = _decode_layout(R, NW)
        shape: gl.constexpr = [R, 4, 4, 8]
        wd = gl.convert_layout(wd, gl.SliceLayout(3, dl), assert_trivial=True)
        mult = gl.convert_layout(mult, gl.SliceLayout(2, gl.SliceLayout(3, dl)), assert_trivial=True)
        wd8 = gl.broadcast(wd[:, :, :, None], gl.full(shape, 0, gl.int32, dl))[0]
        mult8 = gl.broadcast(mult[:, :, None, None], gl.full(shape, 0, gl.bfloat16, dl))[0]
        w = gl.inline_asm_elementwise(_FP4_TO_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [wd8, mult8],
                                      dtype=gl.bfloat16, is_pure=True, pack=8)  # (R, 4 t, 4 j, 8 i)
        # (R, t1, t0, j1, j0, i2, i1, i0) -> (R, j1, j0, i2, i1, t1, t0, i0): MMA k = 32 j + 16 i2 + 8 i1 + 2 t + i0
        a = gl.reshape(gl.permute(gl.reshape(w, [R, 2, 2, 2, 2, 2, 2, 2]), [0, 3, 4, 5, 6, 1, 2, 7]), [R, 128])
        return gl.convert_layout(a, _a_layout(NW, T), assert_trivial=True)

    @gluon.jit
    def _mma_columns(u):
        """Input indices u -> their columns in the MMA's k order (the module docstring's permutation, within
        each step of 128): input 128 q + 32 t + 8 j + 4 i0 + 2 i1 + i2 -> 128 q + 32 j + 16 i2 + 8 i1 + 2 t + i0."""
        a = u % 128
        return u - a + 32 * ((a // 8) % 4) + 16 * (a % 2) + 8 * ((a // 2) % 2) + 2 * (a // 32) + (a // 4) % 2

    @gluon.jit
    def _mma_inputs(c):
        """Columns c in the MMA's k order -> their input indices (`_mma_columns` inverted, within each step of 128):
        column 128 q + 32 j + 16 i2 + 8 i1 + 2 t + i0 -> input 128 q + 32 t + 8 j + 4 i0 + 2 i1 + i2."""
        a = c % 128
        return c - a + 32 * ((a // 2) % 4) + 8 * (a // 32) + 4 * (a % 2) + 2 * ((a // 8) % 2) + (a // 16) % 2

    @gluon.jit
    def _permute_kernel(
        x_ptr,  # (N, H) bf16
        xp_ptr,  # (N, HP) bf16 out
        N,
        H: gl.constexpr, HP: gl.constexpr,
        ROWS: gl.constexpr,
    ):
        """xp[n] = x[n], its inputs in the MMA's k order, zeros past H: mlp1's B operand as rows that `cp.async`
        copies whole (each token once; mlp1 finds a sorted row's token through the pair order)."""
        lay: gl.constexpr = _copy_layout(gl.num_warps())
        rows = gl.program_id(0) * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, lay))
        rmask = (rows < N)[:, None]
        rows = rows.to(gl.int64)[:, None]
        c = gl.arange(0, 128, layout=gl.SliceLayout(0, lay))[None, :]
        for q in range(HP // 128):
            # each 16-byte store is contiguous; the loads gather within the step's 256-byte span of the row
            u = _mma_inputs(128 * q + c)
            xv = gl.load(x_ptr + rows * H + u, mask=rmask & (u < H), other=0.0)
            gl.store(xp_ptr + rows * HP + 128 * q + c, xv, mask=rmask)

    @gluon.constexpr_function
    def _wcopy_layout(nw):
        """(R, 4, 4) a step's packed words as copied to shared memory: one block of a row (16 bytes) a thread."""
        return gl.BlockedLayout([1, 1, 4], [8, 4, 1], [nw, 1, 1], [2, 1, 0])

    @gluon.jit
    def _copy_words(wbuf, wc_rows, tq, q, STEPS: gl.constexpr, G: gl.constexpr):
        """Starts the copy of step q's packed words (R, 4, 4) into wbuf (steps past the last copy the last); the
        caller commits the group."""
        _copy_to_shared(wbuf, wc_rows + gl.minimum(4 * gl.minimum(q, STEPS - 1) + tq, G - 1) * 4)

    @gluon.jit
    def _wgmma_rows(w_ptr, s_ptr, wrow, x_ptr, xrow, KDIM: gl.constexpr, KP: gl.constexpr, T: gl.constexpr,
                    NW: gl.constexpr):
        """sum_k W[wrow[r], k] * X[xrow[n], k] -> (R, T) float32 in `_acc_layout`, for packed rows wrow (R,) int64
        of a (., KDIM) MXFP4 matrix (w_ptr: its int32 words) and activation rows xrow (T,) int64 of a (., KP)
        bf16 matrix whose columns are in the MMA's k order (`_mma_columns`; KP = KDIM rounded up to 128, zeros
        past KDIM). Every row index must be valid (callers point unused rows at a real one and drop their
        results). wrow in `_row_layout`, xrow in SliceLayout(1, `_copy_layout`)."""
        R: gl.constexpr = wrow.shape[0]
        sl: gl.constexpr = _step_layout(R, NW)
        wl: gl.constexpr = gl.SliceLayout(2, sl)
        G: gl.constexpr = KDIM // 32
        STEPS: gl.constexpr = KP // 128
        t4 = gl.arange(0, 4, layout=gl.SliceLayout(0, wl))[None, :]
        s_ptrs = s_ptr + wrow[:, None] * G
        kx = gl.arange(0, 128, layout=gl.SliceLayout(0, _copy_layout(NW)))
        x_ptrs = x_ptr + xrow[:, None] * KP + kx[None, :]
        # activation tiles: copied two steps ahead into four buffers, separate allocations used in a fixed
        # rotation (the loop is unrolled by 4), so that Triton's shared-memory hazard analysis sees that the copy
        # into step q + 2's buffer does not touch the buffer the in-flight MMA of step q reads, and adds no
        # barrier there; that buffer was last read by the MMA of step q - 2, which every warpgroup retired before
        # the barrier of step q
        bufs = (gl.allocate_shared_memory(gl.bfloat16, [T, 128], _acts_shared_layout()),
                gl.allocate_shared_memory(gl.bfloat16, [T, 128], _acts_shared_layout()),
                gl.allocate_shared_memory(gl.bfloat16, [T, 128], _acts_shared_layout()),
                gl.allocate_shared_memory(gl.bfloat16, [T, 128], _acts_shared_layout()))
        # a step's packed words (R, 4 blocks, 4 words): copied WORDS_AHEAD steps ahead into four buffers of their
        # own; the buffer step q + WORDS_AHEAD's copy overwrites was last read at step q - 1, before step q's
        # barrier
        WORDS_AHEAD: gl.constexpr = 3
        wsh: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0])
        wbufs = (gl.allocate_shared_memory(gl.int32, [R, 4, 4], wsh),
                 gl.allocate_shared_memory(gl.int32, [R, 4, 4], wsh),
                 gl.allocate_shared_memory(gl.int32, [R, 4, 4], wsh),
                 gl.allocate_shared_memory(gl.int32, [R, 4, 4], wsh))
        wcl: gl.constexpr = _wcopy_layout(NW)
        wr_c = gl.convert_layout(wrow, gl.SliceLayout(1, gl.SliceLayout(2, wcl)))
        pq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, wcl)))
        wc_rows = w_ptr + wr_c[:, None, None] * (KDIM // 8) + pq[None, None, :]  # (R, 1, 4)
        tq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, wcl)))[None, :, None]  # (1, 4, 1)
        for i in gl.static_range(2):
            _copy_to_shared(bufs[i], x_ptrs + gl.minimum(i, STEPS - 1) * 128)
            if i == 0:  # the first group takes the words of steps 0 .. WORDS_AHEAD - 2, the second the next step's
                for w in gl.static_range(WORDS_AHEAD - 1):
                    _copy_words(wbufs[w], wc_rows, tq, w, STEPS, G)
            else:
                _copy_words(wbufs[WORDS_AHEAD - 1], wc_rows, tq, WORDS_AHEAD - 1, STEPS, G)
            async_copy.commit_group()
        # block multipliers of the step in hand and the next, loaded into registers two steps ahead of their MMA
        s = (gl.zeros([R, T], gl.float32, _acc_layout(NW, T)),  # the accumulators
             gl.zeros([R, 128], gl.bfloat16, _a_layout(NW, T)),  # the A registers of the MMA in flight
             _load_mult(s_ptrs, t4, 0, G), _load_mult(s_ptrs, t4, 1, G))
        for q in range(0, STEPS - 3, 4):
            for i in gl.static_range(4):
                s = _wgmma_step(q + i, s, bufs[i], bufs[(i + 2) % 4], wbufs[i], wbufs[(i + WORDS_AHEAD) % 4],
                                wc_rows, tq, s_ptrs, t4, x_ptrs, G, STEPS, NW, T, WORDS_AHEAD)
        for i in gl.static_range(STEPS % 4):  # the steps after the last whole rotation, in the same rotation
            s = _wgmma_step(STEPS - STEPS % 4 + i, s, bufs[i], bufs[(i + 2) % 4], wbufs[i],
                            wbufs[(i + WORDS_AHEAD) % 4], wc_rows, tq, s_ptrs, t4, x_ptrs, G, STEPS, NW, T, WORDS_AHEAD)
        acc = warpgroup_mma_wait(0, deps=[s[0]])
        async_copy.wait_group(0)
        return acc

    @gluon.jit
    def _wgmma_step(q, s, buf, buf_ahead, wbuf, wbuf_ahead, wc_rows, tq, s_ptrs, t4, x_ptrs, G: gl.constexpr,
                    STEPS: gl.constexpr, NW: gl.constexpr, T: gl.constexpr, WORDS_AHEAD: gl.constexpr):
        """Step q of `_wgmma_rows`: its words read from wbuf and decoded, its MMA (activations in buf) issued, the
        previous one retired, step q + 2's activations copied into buf_ahead and step q + WORDS_AHEAD's words into
        wbuf_ahead, step q + 2's multipliers loaded. s: (accumulators, A registers of the MMA in flight, step q's
        multipliers, step q + 1's) -> the same for step q + 1."""
        acc, a_prev, mult0, mult1 = s
        async_copy.wait_group(1)  # this thread's copies of step q have landed
        _cta_barrier()  # and every thread's
        fence_async_shared()  # (cumulative) before the async proxy of the MMA reads them
        # decoded on the CUDA cores while the MMA of step q - 1 runs
        a = _decode_step(wbuf.load(_step_layout(mult0.shape[0], NW)), mult0, NW, T)
        acc = warpgroup_mma(a, buf.permute((1, 0)), acc, is_async=True)
        # retire the MMA of step q - 1; its A registers (a_prev) stay untouched until then
        acc, a_prev = warpgroup_mma_wait(1, deps=[acc, a_prev])
        _copy_to_shared(buf_ahead, x_ptrs + gl.minimum(q + 2, STEPS - 1) * 128)
        _copy_words(wbuf_ahead, wc_rows, tq, q + WORDS_AHEAD, STEPS, G)
        async_copy.commit_group()
        return acc, a, mult1, _load_mult(s_ptrs, t4, q + 2, G)

    @gluon.constexpr_function
    def _row_layout(r, nw):
        """Layout of the (R,) weight row indices `_wgmma_rows` takes."""
        return gl.SliceLayout(1, gl.SliceLayout(2, _step_layout(r, nw)))

    @gluon.jit
    def _mlp1_swiglu_wgmma_kernel(
        xp_ptr,  # (N, HP) bf16: the tokens, inputs in the MMA's k order (_permute_kernel)
        order_ptr,  # (M,) int32 sorted row -> pair
        seg_ptr,  # (E,) int32 end sorted row of each expert
        E,
        w_ptr,  # (E, 2I, H/32, 4) int32 view of the packed blocks
        s_ptr,  # (E, 2I, H/32) uint8
        b_ptr,  # (E, 2I)
        act_ptr,  # (M, IP) bf16 out, sorted rows, units in the MMA's k order (mlp2's B operand)
        limit,
        tune_m,  # M rounded to a power of two: autotuning key only
        H: gl.constexpr, HP: gl.constexpr, I: gl.constexpr, IP: gl.constexpr, EP: gl.constexpr,
        K_ROUTE: gl.constexpr,
        R: gl.constexpr,  # weight rows per program (R / 2 SwiGLU units)
        T: gl.constexpr,  # sorted rows (tokens) per tile
    ):
        NW: gl.constexpr = gl.num_warps()
        j = gl.program_id(1)
        e, start, end = _tile(seg_ptr, gl.program_id(0), E, EP, T)
        if e < E:
            # rows past the tile's end read its last row (their results are not stored)
            rows = gl.minimum(start + gl.arange(0, T, layout=gl.SliceLayout(1, _copy_layout(NW))), end - 1)
            # tile row r: unit j * R/2 + (r // 16) * 8 + r % 8, gate (row 2u) in r % 16 < 8, linear (2u + 1) above
            # (a lane holds rows g and g + 8: both halves of a unit); units past I read unit I - 1
            r = gl.arange(0, R, layout=_row_layout(R, NW))
            unit = gl.minimum(j * (R // 2) + (r // 16) * 8 + r % 8, I - 1)
            wrow = e.to(gl.int64) * (2 * I) + 2 * unit + (r // 8) % 2
            tok = (gl.load(order_ptr + rows) // K_ROUTE).to(gl.int64)
            acc = _wgmma_rows(w_ptr, s_ptr, wrow, xp_ptr, tok, H, HP, T, NW)  # (R, T)
            out, ts, us = _mlp1_outputs(acc, e, j, start, b_ptr, limit, I)
            gl.store(act_ptr + ts.to(gl.int64)[:, None] * IP + _mma_columns(us)[None, :], out,
                     mask=(ts < end)[:, None] & (us < I)[None, :])

    @gluon.jit
    def _mlp2_wgmma_kernel(
        act_ptr,  # (M, IP) bf16 sorted rows, units in the MMA's k order
        order_ptr,  # (M,) int32
        seg_ptr,  # (E,) int32
        E,
        w_ptr,  # (E, H, I/32, 4) int32 view of the packed blocks
        s_ptr,  # (E, H, I/32) uint8
        b_ptr,  # (E, H)
        y_ptr,  # (M, H) out, original pair order
        tune_m,
        H: gl.constexpr, I: gl.constexpr, IP: gl.constexpr, EP: gl.constexpr,
        R: gl.constexpr,  # output features per program
        T: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        j = gl.program_id(1)
        e, start, end = _tile(seg_ptr, gl.program_id(0), E, EP, T)
        if e < E:
            rows = gl.minimum(start + gl.arange(0, T, layout=gl.SliceLayout(1, _copy_layout(NW))), end - 1)
            hs = gl.minimum(j * R + gl.arange(0, R, layout=_row_layout(R, NW)), H - 1)
            acc = _wgmma_rows(w_ptr, s_ptr, e.to(gl.int64) * H + hs, act_ptr, rows.to(gl.int64), I, IP, T, NW)
            _mlp2_store(acc, e, j, start, end, order_ptr, b_ptr, y_ptr, H)

    # (R, T, warps) candidates, autotuned per (shapes, E, M bucket) on the first call
    _CONFIGS = [(128, 128, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4), (256, 64, 8), (128, 128, 4)]

    _TUNED: dict = {}


def mlp_wgmma_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                   limit: float, k_route: int, *, config: dict | None = None) -> torch.Tensor:
    """Both expert matmuls of the MoE for pairs sorted by expert (`moe_mma.mlp_mma_gemm`'s contract): x (N, H)
    bf16, order (M,) int32 sorted row -> pair, seg_end (E,) int32 end sorted row of each expert -> y (M, H) bf16.
    config: {"R", "T", "num_warps"} instead of autotuning."""

    N, H = x.shape
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = order.numel()
    HP, IP = -(-H // 128) * 128, -(-I // 128) * 128  # the MMA's k steps of 128
    xp = scratch((N, HP), torch.bfloat16, x.device)
    act = scratch((M, IP), torch.bfloat16, x.device)
    # mlp2 multiplies the padding inputs I..IP (zero multipliers) by their columns, so those must hold zeros, not
    # stale bytes that may be NaN; the permutation keeps them within the last step of 128 columns, but scatters
    # them over all of it: zero the whole step, mlp1 writes the real units' columns over it
    act[:, IP - 128:].zero_()
    y = scratch((M, H), torch.bfloat16, x.device)
    EP = triton.next_power_of_2(E)
    tune_m = max(64, triton.next_power_of_2(M))
    n_tiles = lambda t: -(-M // t) + min(E, M)  # noqa: E731 - bound on the tiles of any routing
    k1, k2, opts = kernel_pair((_mlp1_swiglu_wgmma_kernel, _mlp2_wgmma_kernel), _CONFIGS, config, _TUNED)
    _permute_kernel[(triton.cdiv(N, 16),)](x, xp, N, H=H, HP=HP, ROWS=16, num_warps=4)
    k1[lambda m: (n_tiles(m["T"]), triton.cdiv(2 * I, m["R"]))](
        xp, order, seg_end, E, mlp1_blocks.view(torch.int32), mlp1_scales, mlp1_bias, act, limit, tune_m, H=H,
        HP=HP, I=I, IP=IP, EP=EP, K_ROUTE=k_route, **opts)
    k2[lambda m: (n_tiles(m["T"]), triton.cdiv(H, m["R"]))](
        act, order, seg_end, E, mlp2_blocks.view(torch.int32), mlp2_scales, mlp2_bias, y, tune_m, H=H, I=I, IP=IP,
        EP=EP, **opts)
    return y
