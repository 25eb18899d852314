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

This module picks the kernels (see MMA_MIN_TOKENS below for the measured choice); each family has its module:
`moe_gemv`, `moe_gemm_triton`, the tensor-core grouped GEMMs of `moe_mma` (Gluon, 2-512 tokens where it serves) and
`moe_wgmma` (Hopper prefills), the dequantizing `moe_dense` (long prefills); `moe_grouping` groups the pairs by expert
and combines the outputs, `moe_elementwise` holds the FP4 decoding and SwiGLU they share.
  * decode (one token; up to DECODE_MAX_TOKENS where moe_mma does not serve): GEMV on CUDA cores, 3 launches (A, B,
    combine; x in fp32, which the model's fused norm writes), no sort.
    Grid (pair i, block of output rows); program (i, j) runs only if pair i is the first pair routed to its
    expert, and then serves every pair of that expert, so each selected expert's packed bytes are read from
    HBM once. Row-contiguous word tiles (coalesced), FP4 codes -> fp16 through e4m3 conversions on sm_89 and
    later (fp4_octet_e4m3; the 20b decode step 2.089 -> 2.016 ms on H100), else two codes -> an fp16 pair
    with ~5 integer ops (fp4_pair16); the next step's loads issued before the current step's decode. Measured
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
No path synchronizes with the host: calls can be captured in a CUDA graph (after a first, autotuning call).

Run on CPU for debugging with TRITON_INTERPRET=1 (tiny shapes; CPU tensors). Triton 3.6's interpreter needs
numpy < 2.3 for these kernels (loops bounded by a runtime argument fail on numpy 2.4).
"""


import weakref

import torch

from gptoss.kernels import triton_interpreting
from gptoss.kernels.moe_elementwise import denorm_default
from gptoss.kernels.moe_gemm_triton import mlp_triton_gemm
from gptoss.kernels.moe_gemv import mlp_gemv
from gptoss.kernels.moe_grouping import combine, group_pairs

# Which kernels path "auto" runs for N tokens, from scripts/moe_crossover.py (H200, 20b shapes, graphed, us a layer
# call; GEMV / the Triton GEMM (gptoss.kernels.moe_gemm_triton) / the tensor-core GEMM of gptoss.kernels.moe_mma):
#   N=1 36.9 / 79.4 / 59.4, N=2 77.0 / 102.9 / 71.4, N=8 237.1 / 190.7 / 155.4, N=64 - / 291.0 / 243.0,
#   N=256 - / 536.0 / 466.3, N=512 - / 651.7 / 726.2, N=1024 - / 1010.1 / 1276.2;
# with moe_mma's activations staged in shared memory (H200, a later session, the best of the fixed tiles tried):
#   N=64 201.2 vs 259.9, N=256 361.8 vs 438.6, N=512 609.7 vs 653.9, N=1024 1032.4 vs 1017.2 (the Triton GEMM,
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
# gptoss.kernels.moe_wgmma below that; the Triton GEMM elsewhere.
MMA_MIN_TOKENS = 2
MMA_MAX_TOKENS = 512
# The GEMV against the Triton GEMM (H100, with the GEMM's dot_scaled tiles): 185 vs 186 us at 6 tokens, 238 vs
# 243 at 8, 350 vs 307 at 12.
DECODE_MAX_TOKENS = 8


def gemv_serves(num_tokens: int) -> bool:
    """Whether moe_triton's automatic choice runs the GEMV kernels (which read x in float32) for this many tokens
    on a GPU where the tensor-core GEMM serves (elsewhere it also runs them up to DECODE_MAX_TOKENS)."""
    return num_tokens < MMA_MIN_TOKENS


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
    moe_wgmma in between, else the Triton GEMM (moe_gemm_triton)."""
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
      `gptoss.kernels.moe_dense` where it pays; else `gptoss.kernels.moe_gemm_triton`), or one of them:
      "gemm_mma", "gemm_wgmma", "gemm_dense", "gemm_triton".
    config: fixed kernel parameters instead of autotuning (always used under TRITON_INTERPRET=1):
      gemv: {"BLOCK_U", "BLOCK_H", "BLOCK_K", "num_warps"};
      gemm_triton: {"BM", "BN", "BK", "SWAP", "SCALED", "num_warps", "num_stages"};
      gemm_mma, gemm_wgmma: {"R", "T", "num_warps"}.
    denorm: FP4 decode in the GEMM path (None: GPTOSS_MXFP4_DEQUANT, default the fp32-subnormal trick).
    Contract: the K ids of one token are distinct (top-k gives that); the GEMV path relies on it.
    No host synchronization: the call can be captured in a CUDA graph (after a first, autotuning call).
    """
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
        # fp32 activations: a thread multiplies each activation it loads into only one weight row, so a
        # bf16 -> fp32 conversion in the kernel would cost ~1.5 instructions per weight element
        y = mlp_gemv(x.float() if x_float32 is None else x_float32, expert_ids, mlp1_blocks, mlp1_scales, mlp1_bias,
                     mlp2_blocks, mlp2_scales, mlp2_bias, limit, x.dtype, shard=shard, config=config)
        return combine(y, weights, residual, out_dtype, shard=shard)

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
    # the kernels run the experts' segments only: a shard's other ranks' pairs (expert E) sort after them
    order, seg_end = group_pairs(expert_ids.reshape(-1), E + 1 if shard else E)
    seg_end = seg_end[:E]
    if path in ("gemm_mma", "gemm_wgmma"):
        from gptoss.kernels.moe_mma import mlp_mma_gemm
        from gptoss.kernels.moe_wgmma import mlp_wgmma_gemm

        gemm = mlp_mma_gemm if path == "gemm_mma" else mlp_wgmma_gemm
        y = gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                 limit, K, config=config)
        return combine(y, weights, residual, out_dtype, shard=shard)
    if path == "gemm_dense":
        from gptoss.kernels.moe_dense import mlp_dense_gemm

        y, rows = mlp_dense_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                                 mlp2_bias, limit, K)
        return combine(y, weights, residual, out_dtype, rows=rows, shard=shard)
    y = mlp_triton_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                        limit, K, denorm_default() if denorm is None else denorm, config=config)
    return combine(y, weights, residual, out_dtype, shard=shard)


def moe_triton_from_stores(x, weights, expert_ids, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias, swiglu_limit,
                           **kwargs) -> torch.Tensor:
    """Same signature as gptoss.kernels.moe.moe, taking MXFP4Experts stores (with .blocks / .scales)."""
    return moe_triton(x, weights, expert_ids, mlp1_weight.blocks, mlp1_weight.scales, mlp1_bias,
                      mlp2_weight.blocks, mlp2_weight.scales, mlp2_bias, swiglu_limit, **kwargs)
