"""The MoE grouped GEMM for long prefills: a layer's experts dequantized to bf16, then torch's grouped GEMM.

Above a few thousand tokens every expert holds hundreds of rows and the GEMM is bound by its MMAs, where the
in-register FP4 decode of `moe_triton`'s GEMM (~290 TFLOP/s at 8k tokens on an H100) competes with them. Here a
small kernel first writes the layer's expert matrices as bf16 (exact: every FP4 value times its power-of-two scale
is a bf16 value), and `torch.nn.functional.grouped_mm` (CUTLASS grouped GEMM on sm_90) multiplies each expert's
sorted rows by them. The bias rides in the GEMM: the matrices get one more input column holding the bias (the
inputs a column of ones), padded with zeros to a multiple of 16, so each output is rounded once, from the fp32
sum with its bias, as `F.linear` with a bias rounds it in the pure path.

  sorted rows x_aug (M, KP) = [x of each pair's token | 1 | 0 ...]     (pairs grouped by expert, `group_pairs`)
  h (M, 2I) = grouped_mm(x_aug, W1_aug[e]^T)                        bf16, gate/linear interleaved as stored
  act_aug (M, IP) = [SwiGLU(h) | 1 | 0 ...]                         rounded as the pure path's torch ops round
  y_sorted (M, H) = grouped_mm(act_aug, W2_aug[e]^T)

Costs scratch for a bf16 copy of one matrix of a layer's experts at a time (mlp1's: 1.07 GB for 32 experts of
gpt-oss shapes) and the dequantizing pass (for 32 experts it reads 0.42 GB and writes 1.6 GB), a fixed cost per
layer call that pays off once the experts hold enough rows. Measured on an H100 (20b shapes, 4 pairs a token, a
layer call, CUDA-graph timed as `scripts/moe_crossover.py` times it, in two runs of one session) against
`moe_triton`'s autotuned GEMM, us: 1,024 tokens 1,908 vs 1,009; 2,048: 2,146 vs 1,681; 3,072: 2,597 vs 2,250; 4,096:
3,143 vs 3,025; 6,144: 3,764 vs 4,239; 8,192: 4,718 vs 5,513 (346 vs 296 TFLOP/s); 16,384: 8,154 vs 10,674. The
dequantizing pass alone takes 573 + 288 us (mlp1 + mlp2, 2.35 TB/s). `moe_triton` runs this path where
`dense_gemm_pays`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gptoss.kernels import cuda_capability, triton_interpreting

try:
    import triton
    import triton.language as tl

    from gptoss.kernels.moe_triton import _denorm_default, _fp4_unscaled, _scale_value, _swiglu

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the package works without Triton (pure path)
    HAS_TRITON = False

# Rows per expert (token-expert pairs / experts) from which `moe_triton` runs this path: the crossover of the H100
# figures above (about 4,500 tokens of 4 pairs over 32 experts, ~560 rows an expert).
MIN_ROWS_PER_EXPERT = 576
# The most scratch the bf16 copy of mlp1's experts may take: gpt-oss-20b's 32 experts take 1.07 GB; -120b's 128
# would take 4.3 GB beside 61 GB of weights on an 80 GB card, and keep the Triton GEMM.
MAX_SCRATCH_BYTES = 2 << 30

# Inputs of the augmented matrices: K + 1 (the bias column) rounded up to a multiple of 16 (16-byte rows of bf16
# for the grouped GEMM's alignment, and whole 8-element stores here).
COLUMN_ALIGN = 16


def padded_columns(k: int) -> int:
    return -(-(k + 1) // COLUMN_ALIGN) * COLUMN_ALIGN


if HAS_TRITON:

    @triton.jit
    def _dequantize_kernel(
        blocks_ptr,  # (E * R, K/32, 16) uint8
        scales_ptr,  # (E * R, K/32) uint8
        bias_ptr,  # (E * R,)
        out_ptr,  # (E * R, KP) bf16
        K: tl.constexpr, KP: tl.constexpr,
        ROWS: tl.constexpr,  # rows per program
        GROUPS: tl.constexpr,  # 32-input blocks per program (a power of two)
        DENORM: tl.constexpr,
    ):
        """out[r, :K] = the row's FP4 values times their block scales, out[r, K] = bias[r], zeros to KP."""
        G: tl.constexpr = K // 32
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        gm = g < G
        b = tl.arange(0, 16)
        packed = tl.load(blocks_ptr + (rows[:, None, None] * G + g[None, :, None]) * 16 + b[None, None, :],
                         mask=gm[None, :, None], other=0)  # (ROWS, GROUPS, 16)
        scale = _scale_value(tl.load(scales_ptr + rows[:, None] * G + g[None, :], mask=gm[None, :], other=0))
        lo, hi = _fp4_unscaled(packed, DENORM)
        # element 2b is byte b's low nibble, 2b + 1 its high one: (ROWS, GROUPS, 16, 2) -> (ROWS, GROUPS * 32)
        w = tl.reshape(tl.join(lo, hi) * scale[:, :, None, None], (ROWS, GROUPS * 32))
        cols = tl.program_id(1) * GROUPS * 32 + tl.arange(0, GROUPS * 32)
        tl.store(out_ptr + rows[:, None] * KP + cols[None, :], w.to(tl.bfloat16), mask=(cols < K)[None, :])
        if tl.program_id(1) == 0:  # the bias column and the zero padding after it
            tail = K + tl.arange(0, 16)  # KP - K is 1 .. 16
            bias = tl.load(bias_ptr + rows).to(tl.float32)
            val = tl.where((tail == K)[None, :], bias[:, None], 0.0)
            tl.store(out_ptr + rows[:, None] * KP + tail[None, :], val.to(tl.bfloat16), mask=(tail < KP)[None, :])

    @triton.jit
    def _swiglu_rows_kernel(h_ptr, act_ptr, M, limit, I: tl.constexpr, IP: tl.constexpr, BLOCK: tl.constexpr):
        """act[m, :I] = SwiGLU of h[m] (gate 2u, linear 2u + 1), act[m, I] = 1, zeros to IP."""
        m = tl.program_id(0).to(tl.int64)
        u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        um = u < I
        glu = tl.load(h_ptr + m * (2 * I) + 2 * u, mask=um, other=0.0).to(tl.float32)
        lin = tl.load(h_ptr + m * (2 * I) + 2 * u + 1, mask=um, other=0.0).to(tl.float32)
        out = tl.where(um, _swiglu(glu, lin, limit, tl.bfloat16), tl.where(u == I, 1.0, 0.0))
        tl.store(act_ptr + m * IP + u, out.to(tl.bfloat16), mask=u < IP)


def dequantize_augmented(blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks (E, R, K/32, 16) uint8, scales (E, R, K/32), bias (E, R) -> (E, R, KP) bf16: the dequantized
    matrices with the bias as column K and zeros after it (KP = padded_columns(K))."""
    E, R, G, _ = blocks.shape
    K, KP = 32 * G, padded_columns(32 * G)
    if out is None:
        out = torch.empty((E, R, KP), dtype=torch.bfloat16, device=blocks.device)
    rows, groups = (4, 4) if triton_interpreting() else (16, 16)
    assert (E * R) % rows == 0, "rows a program must divide the matrices' rows"
    _dequantize_kernel[((E * R) // rows, triton.cdiv(G, groups))](
        blocks, scales, bias, out, K=K, KP=KP, ROWS=rows, GROUPS=groups, DENORM=_denorm_default(), num_warps=4)
    return out


def mlp_dense_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                   limit: float, k_route: int) -> torch.Tensor:
    """Both expert matmuls of the MoE for pairs sorted by expert (`moe_mma.mlp_mma_gemm`'s contract): x (N, H)
    bf16, order (M,) int32 sorted row -> pair, seg_end (E,) int32 end sorted row of each expert -> y (M, H) bf16,
    each pair's expert output with its bias, by pair."""
    N, H = x.shape
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = order.numel()
    HP, IP = padded_columns(H), padded_columns(I)
    w1 = dequantize_augmented(mlp1_blocks, mlp1_scales, mlp1_bias)  # (E, 2I, HP)
    x_aug = torch.empty((M, HP), dtype=torch.bfloat16, device=x.device)
    x_aug[:, :H] = x[order.long() // k_route]
    x_aug[:, H] = 1.0
    x_aug[:, H + 1:] = 0.0
    offs = seg_end.to(torch.int32)
    h = F.grouped_mm(x_aug, w1.transpose(1, 2), offs=offs)  # (M, 2I)
    del w1, x_aug
    act = torch.empty((M, IP), dtype=torch.bfloat16, device=x.device)
    block = 256
    _swiglu_rows_kernel[(M, triton.cdiv(IP, block))](h, act, M, float(limit), I=I, IP=IP, BLOCK=block,
                                                     num_warps=4)
    del h
    w2 = dequantize_augmented(mlp2_blocks, mlp2_scales, mlp2_bias)  # (E, H, IP)
    y_sorted = F.grouped_mm(act, w2.transpose(1, 2), offs=offs)  # (M, H)
    y = torch.empty_like(y_sorted)
    y.index_copy_(0, order.long(), y_sorted)
    return y


def dense_gemm_available(x: torch.Tensor) -> bool:
    """Whether this path can serve x: Triton, bf16 activations, and a torch with F.grouped_mm."""
    return HAS_TRITON and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")


def dense_gemm_pays(x: torch.Tensor, num_pairs: int, mlp1_scales: torch.Tensor) -> bool:
    """Whether `moe_triton` runs this path for num_pairs (token, expert) pairs: available, on sm_90 (where it was
    measured; CUTLASS's grouped GEMM), at least MIN_ROWS_PER_EXPERT rows an expert, mlp1's bf16 copy within
    MAX_SCRATCH_BYTES, and not turned off with GPTOSS_MOE_GEMM=triton."""
    E, R1, G = mlp1_scales.shape
    return (x.is_cuda and dense_gemm_available(x) and os.environ.get("GPTOSS_MOE_GEMM", "mma") != "triton"
            and num_pairs >= MIN_ROWS_PER_EXPERT * E and E * R1 * padded_columns(32 * G) * 2 <= MAX_SCRATCH_BYTES
            and cuda_capability(x)[0] == 9)
