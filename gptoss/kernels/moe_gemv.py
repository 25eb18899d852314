"""The MoE for a few tokens (decode): GEMVs on the CUDA cores over packed MXFP4 experts, no sort.

Grid (pair i, block of output rows); program (i, j) runs only if pair i is the first pair routed to its expert,
and then serves every pair of that expert (count <= tokens, usually 1; repeats hit L1/L2), so each selected expert's
packed bytes are read from HBM once. Row-contiguous word tiles (coalesced), FP4 codes -> fp16 through e4m3
conversions on sm_89 and later (`fp4_octet_e4m3`), else two codes -> an fp16 pair with ~5 integer ops
(`fp4_pair16`); the next step's loads issued before the current step's decode. Outputs are indexed by pair; the
caller combines them (`gptoss.kernels.moe_grouping.combine`). Measurements and the forms tried: `moe_triton`'s
docstring and docs/performance.md.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels import arch_switch, cuda_arch, scratch, triton_interpreting
from gptoss.kernels.moe_elementwise import fp4_octet_e4m3, fp4_pair16, swiglu_rounded
from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


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
    FP8_CVT: 8 codes a word through e4m3 conversions (fp4_octet_e4m3, sm_89+); else two codes per 32-bit op
    (fp4_pair16, ~5 SASS instructions per weight on sm_90). The next step's loads are issued before this
    step's decode (registers double-buffered): a program makes only a few steps, so without this each step
    waits a full memory latency."""
    NG: tl.constexpr = BLOCK_K // 32
    R: tl.constexpr = rows.shape[0]
    acc = tl.zeros((R, NG), dtype=tl.float32)
    wd, s, v = _load_step(w_ptr, s_ptr, v_ptr, rows, rmask, 0, KDIM, BLOCK_K)
    for k0 in range(0, KDIM, BLOCK_K):
        wd_n, s_n, v_n = _load_step(w_ptr, s_ptr, v_ptr, rows, rmask, k0 + BLOCK_K, KDIM, BLOCK_K)
        if FP8_CVT:
            o0, o2, o4, o6, o1, o3, o5, o7 = fp4_octet_e4m3(wd.to(tl.int32, bitcast=True))
            sc = ((s.to(tl.uint32) + 6) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127) * 2^6
        else:
            o0, o4 = fp4_pair16(wd, 0)
            o1, o5 = fp4_pair16(wd, 1)
            o2, o6 = fp4_pair16(wd, 2)
            o3, o7 = fp4_pair16(wd, 3)
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
    FP8_CVT: tl.constexpr,  # FP4 decoded through e4m3 (`fp4_octet_e4m3`, sm_89+)
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
            out = swiglu_rounded(glu, lin, limit, ACT_DTYPE)
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


def _gemv_configs(rows_name: str, pairs: bool) -> list:
    out = []
    for rows, bk, warps in [(32, 256, 4), (32, 512, 4), (64, 256, 4), (64, 512, 8), (16, 512, 4),
                            (128, 256, 8), (16, 256, 2), (32, 256, 2)]:
        out.append(triton.Config({rows_name: rows // 2 if pairs else rows, "BLOCK_K": bk}, num_warps=warps,
                                 num_stages=1))
    return out


_TUNED: dict = {}


def _tuned(name: str):
    """The autotuned kernel `name` (mlp1_gemv or mlp2_gemv), tuned once per key (shapes) and kept in Triton's
    on-disk cache, so later processes skip the tuning; outputs are fully rewritten, so reruns are safe."""
    if name not in _TUNED:
        configs, kernel = {
            "mlp1_gemv": (_gemv_configs("BLOCK_U", True), _mlp1_swiglu_gemv_kernel),
            "mlp2_gemv": (_gemv_configs("BLOCK_H", False), _mlp2_gemv_kernel),
        }[name]
        _TUNED[name] = triton.autotune(configs, key=["H", "I"], cache_results=True)(kernel)
    return _TUNED[name]


def mlp_gemv(x_float32: torch.Tensor, expert_ids: torch.Tensor, mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor,
             mlp1_bias: torch.Tensor, mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
             limit: float, dtype: torch.dtype, shard: bool = False, config: dict | None = None) -> torch.Tensor:
    """x_float32 (N, H) float32, expert_ids (N, K) -> y (N * K, H) in dtype: each (token, expert) pair's expert
    output with its bias, by pair (token * K + k), rounded as the pure path's F.linear on dtype tensors rounds it.
    shard: expert id E (the stores' expert count) marks another rank's pair, which no program computes.
    config: {"BLOCK_U", "BLOCK_H", "BLOCK_K", "num_warps"} instead of autotuning (always under the interpreter)."""
    n, H = x_float32.shape
    K = expert_ids.shape[1]
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = n * K
    ids = expert_ids.reshape(-1).contiguous()
    MP = triton.next_power_of_2(M)
    w1 = mlp1_blocks.view(torch.int32)  # (E, 2I, H/32, 4) words
    w2 = mlp2_blocks.view(torch.int32)
    act = scratch((M, I), torch.float32, x_float32.device)
    y = scratch((M, H), dtype, x_float32.device)
    interp = triton_interpreting()
    if config is None and not interp:
        k1, k2 = _tuned("mlp1_gemv"), _tuned("mlp2_gemv")
        c1 = c2 = {}
    else:
        c = {"BLOCK_U": 64, "BLOCK_H": 128, "BLOCK_K": 256, "num_warps": 4, **(config or {})}
        k1, k2 = _mlp1_swiglu_gemv_kernel, _mlp2_gemv_kernel
        c1 = {"BLOCK_U": c["BLOCK_U"], "BLOCK_K": c["BLOCK_K"], "num_warps": c["num_warps"], "num_stages": 1}
        c2 = {"BLOCK_H": c["BLOCK_H"], "BLOCK_K": c["BLOCK_K"], "num_warps": c["num_warps"], "num_stages": 1}
    pdl = pdl_enabled(x_float32)
    # the FP4 decode through e4m3 conversions where they exist (sm_89 and later): 3.5% faster decode on H100
    fp8 = not interp and arch_switch("FP8_CVT", cuda_arch(x_float32))
    k1[lambda m: (M, triton.cdiv(I, m["BLOCK_U"]))](
        x_float32, ids, w1, mlp1_scales, mlp1_bias, act, M, E, limit, H=H, I=I, K_ROUTE=K, MP=MP, PDL=pdl,
        ACT_DTYPE=_TL_DTYPES[dtype], FP8_CVT=fp8, SHARD=shard, launch_pdl=pdl, **c1)
    k2[lambda m: (M, triton.cdiv(H, m["BLOCK_H"]))](act, ids, w2, mlp2_scales, mlp2_bias, y, M, E, H=H, I=I, MP=MP,
                                                     PDL=pdl, FP8_CVT=fp8, SHARD=shard, launch_pdl=pdl, **c2)
    return y
