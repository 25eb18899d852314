"""The MoE's grouped GEMM in Triton over packed MXFP4 experts: the path wherever the Gluon tensor-core kernels
(`moe_mma`, `moe_wgmma`) and the dequantizing GEMM (`moe_dense`) do not serve, and the numerics they are tested
against.

The pairs come grouped by expert (`gptoss.kernels.moe_grouping.group_pairs`); tl.dot runs over (BM sorted rows of
one expert) x (BN outputs) tiles. Grid (column block j, row tile t), column blocks fastest, so the programs in flight
share the gathered activation tile through L2. Tile t is found in-kernel from the per-expert row ends of the sorted
pairs, for the kernel's own BM, so BM is autotuned with BN / BK / warps / stages (key: shapes, E and M's power-of-two
bucket). Plain tl.dot (wgmma on Hopper, mma on Ampere) on tiles dequantized here; SWAP computes W @ x^T so the
dequantized weight tile is the MMA's register operand. With bf16 activations the autotuner also tries SCALED tiles,
where tl.dot_scaled takes the packed bytes and scales as stored and Triton decodes them in the MMA's operand layout:
the same numbers bit for bit. Measurements: `moe_triton`'s docstring and docs/performance.md.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels import scratch, triton_interpreting
from gptoss.kernels.moe_elementwise import fp4_unscaled, scale_value, swiglu_rounded


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
    lo, hi = fp4_unscaled(b, DENORM)
    sc = scale_value(s)[:, :, None]
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
    out = swiglu_rounded(glu, lin, limit, x_ptr.dtype.element_ty)  # (BM, BN)
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


def _tuned(mlp1: bool, bf16: bool):
    """The autotuned GEMM kernel of mlp1 or mlp2, with tl.dot_scaled tiles among its candidates for bf16
    activations (the only ones they take). Tuned once per key and kept in Triton's on-disk cache, so later
    processes skip the tuning; outputs are fully rewritten, so reruns are safe."""
    name = ("mlp1" if mlp1 else "mlp2") + ("_bf16" if bf16 else "")
    if name not in _TUNED:
        kernel = _mlp1_swiglu_dot_kernel if mlp1 else _mlp2_dot_kernel
        # E in the key: 20b and 120b share H and I, but 4x the experts means 4x fewer rows per expert at the same
        # token count, so another best row tile
        _TUNED[name] = triton.autotune(_dot_configs(mlp1, bf16), key=["H", "I", "E", "tune_m"],
                                       cache_results=True)(kernel)
    return _TUNED[name]


def mlp_triton_gemm(x: torch.Tensor, order: torch.Tensor, seg_end: torch.Tensor, mlp1_blocks: torch.Tensor,
                    mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor, mlp2_blocks: torch.Tensor,
                    mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor, limit: float, experts_per_token: int,
                    denorm: bool, config: dict | None = None) -> torch.Tensor:
    """x (N, H); the pairs grouped by expert (order, seg_end from `group_pairs`) -> y (N * K, H) in x's dtype: each
    pair's expert output with its bias, by pair. denorm: the FP4 decode form (`fp4_unscaled`). config: {"BM", "BN",
    "BK", "SWAP", "SCALED", "num_warps", "num_stages"} instead of autotuning (always under the interpreter)."""
    H = x.shape[1]
    M = order.numel()
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    interp = triton_interpreting()
    act = scratch((M, I), x.dtype, x.device)  # SwiGLU output, sorted rows
    y = scratch((M, H), x.dtype, x.device)  # expert outputs, pair order
    EP = triton.next_power_of_2(E)
    tune_m = max(64, triton.next_power_of_2(M))
    n_tiles = lambda bm: triton.cdiv(M, bm) + min(E, M)  # noqa: E731 - bound on the tiles of any routing
    if config is None and not interp:
        bf16 = x.dtype == torch.bfloat16
        k1, k2 = _tuned(True, bf16), _tuned(False, bf16)
        c = {}
    else:
        k1, k2 = _mlp1_swiglu_dot_kernel, _mlp2_dot_kernel
        c = {"BM": 16, "BN": 32, "BK": 64, "SWAP": False, "SCALED": False, "num_warps": 4, "num_stages": 2,
             **(config or {})}
        if c["SCALED"] and (interp or x.dtype != torch.bfloat16):
            raise ValueError("SCALED (tl.dot_scaled) tiles need bf16 activations on a GPU")
    k1[lambda m: (triton.cdiv(I, m["BN"]), n_tiles(m["BM"]))](
        x, order, seg_end, E, mlp1_blocks, mlp1_scales, mlp1_bias, act, limit, tune_m,
        H=H, I=I, K_ROUTE=experts_per_token, EP=EP, DENORM=denorm, DOT_F32=interp, **c)
    k2[lambda m: (triton.cdiv(H, m["BN"]), n_tiles(m["BM"]))](
        act, order, seg_end, E, mlp2_blocks, mlp2_scales, mlp2_bias, y, tune_m,
        H=H, I=I, EP=EP, DENORM=denorm, DOT_F32=interp, **c)
    return y
