"""MoE decode on the tensor cores: the MXFP4 GEMV as `mma.sync` m16n8k16 with the packed expert rows as operand A.

The CUDA-core GEMV (`moe_triton`'s decode path) spends ~5.7 instructions a weight decoding FP4 and multiplying, and
reads the weights into registers, so the bytes it keeps in flight are bounded by its registers and warps (Nsight
Compute: ~34% of DRAM bandwidth at one token, README "Where the time goes"). Here:

  * The packed rows stream into shared memory through a ring of STAGES buffers filled with `cp.async` (16 bytes a
    copy, several steps ahead), so the bytes in flight no longer depend on registers.
  * Lane (g, t) of a warp reads one 32-bit word a row (rows g and g + 8 of its 16-row tile) of each 16-byte block:
    bytes 4t .. 4t+3, inputs 8t .. 8t+7. That is the A operand layout of an fp16 MMA with k-width 8 (Gluon's
    DotOperandLayout(0, mma, k_width=8)); the activations take the matching B layout. 16-byte pieces are swizzled
    across rows in shared memory, so the 32 lanes' words fall in 32 different banks.
  * FP4 -> fp16 in 11 instructions for 8 weights (`_FP4_TO_F16`): the code's sign, exponent and mantissa bits are
    moved into an fp8 e4m3 byte as sign | exponent field e | mantissa top bit m, which is the FP4 value times 2^-6
    (code 1 = 0.5 lands on the e4m3 subnormal 2^-7), and `cvt.rn.f16x2.e4m3x2` (sm_89+) widens two at a time. The
    MMA's k order within a lane is the order the decode produces them in (the 4 low nibbles, then the 4 high
    ones); the activations are permuted the same way in registers, so no operand needs a shuffle.
  * Each block's two MMAs start from zero and the block scale 2^(s - 127) (times 2^6, and 2^XSHIFT for the
    activations' scaling) is applied to the fp32 partial sums: exact, since both are powers of two.
  * The activations (float32, bf16 values) are multiplied by 2^-XSHIFT and rounded to fp16, which holds bf16
    values exactly from 2^(XSHIFT-17) to 2^(XSHIFT+16) in magnitude: XSHIFT = 8 keeps anything below 2^24 finite,
    and what fp16 rounds (magnitudes under 2^-9) moves a dot product by under 2^-17 times the weights' sum.

Columns of the MMA are the tokens: with N <= 8 tokens and each token's K experts distinct, an expert serves at most
one pair a token, so column n is token n (zero when token n is not routed to the expert) and one pass over an
expert's rows serves all its pairs. Grid and outputs are the CUDA-core GEMV's (`moe_triton`): program (i, j) runs
only if pair i is the first pair of its expert and computes row block j for all of them; act and y are by pair.

Needs Gluon (Triton 3.6's `triton.experimental.gluon`) and sm_89+ (the fp8 conversion).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

try:  # Gluon's API is experimental: any mismatch disables this path, never the package
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    from gptoss.kernels.pdl import wait_for_prior_kernel
    from gptoss.kernels.swiglu_triton import swiglu_rounded

    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False

MAX_TOKENS = 8  # the MMA's N: one column a token
XSHIFT = 8  # activations enter the MMA as fp16(x * 2^-XSHIFT), see the module docstring
# Launch configurations (rows a program, warps, 32-input blocks a step (4 or 8), ring slots), autotuned on first use.
_CONFIGS = [(64, 4, 8, 4), (64, 4, 4, 4), (32, 2, 8, 4), (128, 4, 8, 4), (128, 8, 8, 4), (64, 4, 8, 8),
            (32, 2, 4, 8), (64, 2, 8, 4)]


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
    def _mma_layout(nw):
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])

    @gluon.constexpr_function
    def _bytes_layout(r, nw):
        """(R, 16) packed bytes of one block: lane (g, t) holds bytes 4t .. 4t+3 (registers 0-1) of rows g and g + 8
        (register 2) of its warp's 16-row tiles (warps stacked, then further tiles in registers)."""
        warps = [[16 << w, 0] for w in range(_log2(nw))]
        tiles = [[16 * nw << m, 0] for m in range(_log2(r // (16 * nw)))]
        return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]] + tiles,
                                          lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=warps, block_bases=[], shape=[r, 16])

    @gluon.constexpr_function
    def _acts_layout(nw):
        """(32, 8) activations of one block: lane (g, t) holds inputs 8t .. 8t+7 of column g (every warp the same)."""
        return gl.DistributedLinearLayout(reg_bases=[[1, 0], [2, 0], [4, 0]],
                                          lane_bases=[[8, 0], [16, 0], [0, 1], [0, 2], [0, 4]],
                                          warp_bases=[[0, 0]] * _log2(nw), block_bases=[], shape=[32, 8])

    @gluon.constexpr_function
    def _copy_layout(r, width, nw):
        """(R, WIDTH) bytes of a stage, 16 contiguous bytes a thread (one cp.async each)."""
        tc = min(width // 16, 32)
        return gl.BlockedLayout([1, 16], [32 // tc, tc], [nw, 1], [1, 0])

    @gluon.constexpr_function
    def _ring_layout(width):
        """Shared (R, WIDTH) ring slot (allocated as (STAGES, R, WIDTH)), 16-byte pieces XOR-swizzled across rows: the rows g = 0 .. 7 that a warp
        reads in one instruction (4 bytes of the same block each) land in 8 different 16-byte bank groups."""
        return gl.SwizzledSharedLayout(vec=16, per_phase=max(1, 128 // width), max_phase=width // 16, order=[1, 0])

    @gluon.jit
    def _issue_stage(ring, w_ptr, rows_c, rmask_c, cols_c, k_step, G: gl.constexpr, GS: gl.constexpr,
                     STAGES: gl.constexpr):
        """cp.async blocks k_step * GS .. + GS - 1 of the tile's rows into ring slot k_step % STAGES (blocks past G
        and rows past the matrix's are zero-filled), as one commit group."""
        g = k_step * GS + cols_c // 16
        ptrs = w_ptr + rows_c[:, None] * (G * 16) + (k_step * GS * 16 + cols_c)[None, :]
        async_copy.async_copy_global_to_shared(ring.index(k_step % STAGES), ptrs,
                                               mask=rmask_c[:, None] & (g < G)[None, :])
        async_copy.commit_group()

    @gluon.jit
    def _mma_gemv_rows(w_ptr, s_ptr, row0, nrows, x_ptr, xrow, xmask, KDIM: gl.constexpr, R: gl.constexpr,
                       GS: gl.constexpr, STAGES: gl.constexpr, XSHIFT: gl.constexpr, NW: gl.constexpr):
        """sum_k W[row0 + r, k] * X[xrow[n], k] for r < R (rows past nrows read as zeros) of a (rows, KDIM) MXFP4
        matrix and 8 activation rows of a (., KDIM) float32 matrix (xrow: int64 and xmask, masked columns count
        as zeros, both in SliceLayout(0, `_acts_layout`)) -> (R, 8) float32 in the MMA layout.
        A step is GS 32-input blocks; the packed rows of step s + STAGES - 1 are copied while step s computes."""
        mma: gl.constexpr = _mma_layout(NW)
        a_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b_dot: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        bl: gl.constexpr = _bytes_layout(R, NW)
        xl: gl.constexpr = _acts_layout(NW)
        WIDTH: gl.constexpr = 16 * GS
        cl: gl.constexpr = _copy_layout(R, WIDTH, NW)
        G: gl.constexpr = KDIM // 32
        NSTEPS: gl.constexpr = (G + GS - 1) // GS
        ring = gl.allocate_shared_memory(gl.uint8, [STAGES, R, WIDTH], _ring_layout(WIDTH))
        local_c = gl.arange(0, R, layout=gl.SliceLayout(1, cl))
        rows_c = row0 + local_c
        rmask_c = local_c < nrows
        cols_c = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, cl))
        for st in gl.static_range(STAGES - 1):
            _issue_stage(ring, w_ptr, rows_c, rmask_c, cols_c, st, G, GS, STAGES)
        local_s = gl.arange(0, R, layout=gl.SliceLayout(1, mma))
        s_ptrs = s_ptr + (row0 + local_s) * G
        s_ok = local_s < nrows
        kin = gl.arange(0, 32, layout=gl.SliceLayout(1, xl))
        x_ptrs = x_ptr + xrow[None, :] * KDIM + kin[:, None]
        x_ok = xmask[None, :]
        acc = gl.zeros([R, 8], gl.float32, mma)
        zero = gl.zeros([R, 8], gl.float32, mma)
        for st in range(NSTEPS):
            gl.thread_barrier()  # every warp is done with the slot the next copy overwrites
            _issue_stage(ring, w_ptr, rows_c, rmask_c, cols_c, st + STAGES - 1, G, GS, STAGES)
            async_copy.wait_group(STAGES - 1)  # this thread's copies of step st have landed
            gl.thread_barrier()  # ... and every thread's
            slot = ring.index(st % STAGES)
            for q in gl.static_range(GS):
                g = st * GS + q
                ok = g < G
                s = gl.load(s_ptrs + g, mask=s_ok & ok, other=0)
                xv = gl.load(x_ptrs + g * 32, mask=x_ok & ok, other=0.0)
                wb = slot.slice(q * 16, 16, dim=1).load(bl)
                lo, hi = gl.inline_asm_elementwise(_FP4_TO_F16, "=r,=r,=r,=r,r", [wb],
                                                   dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
                # (R, 16, 2) = (R, 4 t, 4 j, 2 h) -> (R, t, h, j): MMA input 8t + 4h + j is byte 4t + j's nibble h
                a = gl.reshape(gl.permute(gl.reshape(gl.join(lo, hi), [R, 4, 4, 2]), [0, 1, 3, 2]), [R, 32])
                # activations (32, 8): input 8t + 2j + h to MMA row 8t + 4h + j
                xh = (xv * (2.0 ** -XSHIFT)).to(gl.float16)
                b = gl.reshape(gl.permute(gl.reshape(xh, [4, 4, 2, 8]), [0, 2, 1, 3]), [32, 8])
                part = mma_v2(gl.convert_layout(a, a_dot), gl.convert_layout(b, b_dot), zero)
                # 2^(s - 127) * 2^6 (fp8 offset) * 2^XSHIFT as float32 bits
                acc += part * ((s.to(gl.int32) + (6 + XSHIFT)) << 23).to(gl.float32, bitcast=True)[:, None]
        async_copy.wait_group(0)
        return acc

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
        x_ptr,  # (N, H) float32 activations
        ids_ptr,  # (M,) expert id of each pair (token * K + k)
        w_ptr,  # (E, 2I, H/32, 16) packed blocks
        s_ptr,  # (E, 2I, H/32) scales
        b_ptr,  # (E, 2I)
        act_ptr,  # (M, I) float32 out, by pair (mlp2's input)
        N, M, limit,
        H: gl.constexpr, I: gl.constexpr, K_ROUTE: gl.constexpr, KP: gl.constexpr, ACT_DTYPE: gl.constexpr,
        MP: gl.constexpr, R: gl.constexpr, GS: gl.constexpr, STAGES: gl.constexpr, XSHIFT: gl.constexpr,
        PDL: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        cl: gl.constexpr = gl.SliceLayout(0, _acts_layout(NW))
        ol: gl.constexpr = _mma_layout(NW)
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
                                 GS, STAGES, XSHIFT, NW)
            local = j * R + gl.arange(0, R, layout=gl.SliceLayout(1, ol))
            h = acc + gl.load(b_ptr + row0 + local - j * R, mask=local < 2 * I, other=0.0).to(gl.float32)[:, None]
            # (R, 8) -> (R/2, 2, 8) -> (R/2, 8, 2): gate and linear rows side by side in one thread
            glu, lin = gl.split(gl.permute(gl.reshape(gl.convert_layout(h, pl), [R // 2, 2, 8]), [0, 2, 1]))
            out = swiglu_rounded(glu, lin, limit, ACT_DTYPE)
            pair_o, has_o = _expert_columns(ids_ptr, e, N, K_ROUTE, KP, gl.SliceLayout(0, out.type.layout))
            units = j * (R // 2) + gl.arange(0, R // 2, layout=gl.SliceLayout(1, out.type.layout))
            gl.store(act_ptr + pair_o[None, :] * I + units[:, None], out, mask=has_o[None, :] & (units < I)[:, None])

    @gluon.jit
    def _mlp2_mma_kernel(
        act_ptr,  # (M, I) float32, by pair
        ids_ptr,  # (M,) expert id of each pair
        w_ptr,  # (E, H, I/32, 16) packed blocks
        s_ptr,  # (E, H, I/32) scales
        b_ptr,  # (E, H)
        y_ptr,  # (M, H) out: expert output (with its bias), by pair
        N, M,
        H: gl.constexpr, I: gl.constexpr, K_ROUTE: gl.constexpr, KP: gl.constexpr,
        MP: gl.constexpr, R: gl.constexpr, GS: gl.constexpr, STAGES: gl.constexpr, XSHIFT: gl.constexpr,
        PDL: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        cl: gl.constexpr = gl.SliceLayout(0, _acts_layout(NW))
        ol: gl.constexpr = _mma_layout(NW)
        i = gl.program_id(0)
        j = gl.program_id(1)
        wait_for_prior_kernel(PDL)
        leader, e = _leader_expert(ids_ptr, i, M, MP)
        if leader:
            pair, has = _expert_columns(ids_ptr, e, N, K_ROUTE, KP, cl)
            acc = _mma_gemv_rows(w_ptr, s_ptr, e.to(gl.int64) * H + j * R, H - j * R, act_ptr, pair.to(gl.int64), has,
                                 I, R, GS, STAGES, XSHIFT, NW)
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
            configs = [triton.Config({"R": r, "GS": gs, "STAGES": st}, num_warps=w, num_stages=1)
                       for r, w, gs, st in _CONFIGS]
            _TUNED[name] = triton.autotune(configs, key=["H", "I"], cache_results=True)(kernel)
        return _TUNED[name]




def mlp_mma_gemv(xf, ids, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit: float,
                 k_route: int, act_dtype, out_dtype, *, pdl: bool, config: dict | None = None) -> torch.Tensor:
    """Both expert matmuls of the decode MoE on the tensor cores: xf (N, H) float32 activations (N <= 8), ids (M,)
    flat expert ids (M = N * k_route) -> y (M, H) in out_dtype, each pair's expert output with its bias (the
    CUDA-core GEMV's contract, see `moe_triton`). act_dtype: a tl dtype, the SwiGLU's rounding (the model's dtype).
    config: {"R", "GS", "STAGES", "num_warps"} instead of autotuning."""
    N, H = xf.shape
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = ids.numel()
    if N > MAX_TOKENS:
        raise ValueError(f"the tensor-core GEMV serves at most {MAX_TOKENS} tokens, got {N}")
    act = torch.empty((M, I), dtype=torch.float32, device=xf.device)
    y = torch.empty((M, H), dtype=out_dtype, device=xf.device)
    common = dict(K_ROUTE=k_route, KP=triton.next_power_of_2(k_route), MP=triton.next_power_of_2(M), XSHIFT=XSHIFT,
                  PDL=pdl)
    if config is None:
        k1, k2, c = _tuned("mlp1"), _tuned("mlp2"), {}
    else:
        k1, k2 = _mlp1_swiglu_mma_kernel, _mlp2_mma_kernel
        c = {k: config[k] for k in ("R", "GS", "STAGES", "num_warps")}
    k1[lambda m: (M, triton.cdiv(2 * I, m["R"]))](
        xf, ids, mlp1_blocks, mlp1_scales, mlp1_bias, act, N, M, limit, H=H, I=I, ACT_DTYPE=act_dtype,
        launch_pdl=pdl, **common, **c)
    k2[lambda m: (M, triton.cdiv(H, m["R"]))](
        act, ids, mlp2_blocks, mlp2_scales, mlp2_bias, y, N, M, H=H, I=I, launch_pdl=pdl, **common, **c)
    return y
