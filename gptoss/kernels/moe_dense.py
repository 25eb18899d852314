"""The MoE grouped GEMM for long prefills: a layer's experts dequantized to bf16, then torch's grouped GEMM.

Above a few thousand tokens every expert holds hundreds of rows and the GEMM is bound by its MMAs, where the
in-register FP4 decode of the Triton GEMM (~290 TFLOP/s at 8k tokens on an H100) competes with them. Here a
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
layer call that pays off once the experts hold enough rows (so a long step pays it once: mlp1 runs over chunks of
CHUNK_ROWS sorted rows with one dequantized copy). Around the GEMMs, one kernel gathers each expert's rows
into the augmented matrix and records where each pair's row went, the SwiGLU reads each unit's gate and linear
values as one contiguous pair, and the combine reads the outputs by sorted row (no copy back into pair order).
Measured on an H100 (20b shapes, 4 pairs a token, a layer call, CUDA-graph timed as `scripts/moe_crossover.py`
times it) against the Triton GEMM (autotuned), us: 2,048 tokens 1,942 vs 1,603; 3,072: 2,345 vs 2,339; 4,096:
2,742 vs 3,056; 8,192: 4,237 vs 5,638. At 8,192 tokens the kernels of a call take 3,910 us (`python
scripts/profile_moe_layer.py gemm_dense 8192`): the CUTLASS GEMMs 2,460, dequantizing 853 (~790 with the tiles
below), SwiGLU 329, gathering the rows 111, combining 96. `moe_triton` runs this path where `dense_gemm_pays`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gptoss.kernels import cuda_capability, triton_interpreting

try:
    import triton
    import triton.language as tl

    from gptoss.kernels.moe_elementwise import denorm_default, fp4_unscaled, scale_value, swiglu_rounded

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the package works without Triton (pure path)
    HAS_TRITON = False

# Rows per expert (token-expert pairs / experts) from which `moe_triton` runs this path: at 3,072 tokens (384 rows
# an expert of 20b's 32) level with the Triton GEMM in the H100 figures above, and 2,248 us against moe_wgmma's
# 2,389 (the next fastest there) in a later session's `scripts/moe_crossover.py` on an H100; 10% faster at 4,096.
MIN_ROWS_PER_EXPERT = 384
# The most scratch the bf16 copy of mlp1's experts may take: gpt-oss-20b's 32 experts take 1.07 GB; -120b's 128
# would take 4.3 GB beside 61 GB of weights on an 80 GB card, and keep the Triton GEMM.
MAX_SCRATCH_BYTES = 2 << 30
# Sorted rows mlp1 takes at a time (16,384 tokens of 4 pairs): its augmented inputs and bf16 outputs for that many
# rows take 1.1 GB at gpt-oss shapes, however long the step.
CHUNK_ROWS = 65536

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
        scale = scale_value(tl.load(scales_ptr + rows[:, None] * G + g[None, :], mask=gm[None, :], other=0))
        lo, hi = fp4_unscaled(packed, DENORM)
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
    def _gather_rows_kernel(x_ptr, order_ptr, rows_ptr, out_ptr, row0, H: tl.constexpr, HP: tl.constexpr,
                            K_ROUTE: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of out (sorted row row0 + r) = [x of pair order[row0 + r]'s token | 1 | 0 ...];
        rows[that pair] = row0 + r (where each pair's output will be, for the combine)."""
        r = tl.program_id(0).to(tl.int64)
        pair = tl.load(order_ptr + row0 + r)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        val = tl.load(x_ptr + (pair // K_ROUTE).to(tl.int64) * H + cols, mask=cols < H, other=0.0)
        val = tl.where(cols == H, 1.0, val)
        tl.store(out_ptr + r * HP + cols, val.to(out_ptr.dtype.element_ty), mask=cols < HP)
        if tl.program_id(1) == 0:
            tl.store(rows_ptr + pair, (row0 + r).to(tl.int32))

    @triton.jit
    def _swiglu_rows_kernel(h_ptr, act_ptr, limit, I: tl.constexpr, IP: tl.constexpr, BLOCK: tl.constexpr):
        """act[m, :I] = SwiGLU of h[m] (gate 2u, linear 2u + 1), act[m, I] = 1, zeros to IP."""
        m = tl.program_id(0).to(tl.int64)
        u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        um = u < I
        # (BLOCK, 2): each unit's gate and linear values, one contiguous run of h's row
        pair = tl.load(h_ptr + m * (2 * I) + 2 * u[:, None] + tl.arange(0, 2)[None, :], mask=um[:, None],
                       other=0.0).to(tl.float32)
        glu, lin = tl.split(pair)
        out = tl.where(um, swiglu_rounded(glu, lin, limit, tl.bfloat16), tl.where(u == I, 1.0, 0.0))
        tl.store(act_ptr + m * IP + u, out.to(tl.bfloat16), mask=u < IP)


def dequantize_augmented(blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks (E, R, K/32, 16) uint8, scales (E, R, K/32), bias (E, R) -> (E, R, KP) bf16: the dequantized
    matrices with the bias as column K and zeros after it (KP = padded_columns(K))."""
    E, R, G, _ = blocks.shape
    K, KP = 32 * G, padded_columns(32 * G)
    if out is None:
        out = torch.empty((E, R, KP), dtype=torch.bfloat16, device=blocks.device)
    # weight rows and 32-input groups a program: the best of `_dequantize_kernel`'s tiles on an H100 (mlp1 / mlp2 of
    # 20b, us): 4 x 32 526 / 265 (2.57 TB/s); 8 x 32 528 / 267; 16 x 16 570 / 289; 16 x 8 647 / 325
    rows, groups = (4, 4) if triton_interpreting() else (4, 32)
    assert (E * R) % rows == 0, "rows a program must divide the matrices' rows"
    _dequantize_kernel[((E * R) // rows, triton.cdiv(G, groups))](
        blocks, scales, bias, out, K=K, KP=KP, ROWS=rows, GROUPS=groups, DENORM=denorm_default(), num_warps=4)
    return out


def mlp_dense_gemm(x, order, seg_end, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                   limit: float, k_route: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both expert matmuls of the MoE for pairs sorted by expert (the inputs of `moe_mma.mlp_mma_gemm`): x (N, H)
    bf16 contiguous, order (M,) int32 sorted row -> pair, seg_end (E,) int32 end sorted row of each expert ->
    (y (M, H) bf16: each pair's expert output with its bias, by sorted row; rows (M,) int32: pair -> its row of y).
    The combine reads y through rows, so the outputs are never copied back into pair order. Each matrix is
    dequantized once a call; mlp1 runs over CHUNK_ROWS sorted rows at a time, so a long step's scratch for its
    inputs and outputs stays bounded while the dequantizing pass is paid once."""
    N, H = x.shape
    E, R1 = mlp1_blocks.shape[:2]
    I = R1 // 2
    M = order.numel()
    HP, IP = padded_columns(H), padded_columns(I)
    block = 1024
    w1 = dequantize_augmented(mlp1_blocks, mlp1_scales, mlp1_bias)  # (E, 2I, HP)
    rows = torch.empty(M, dtype=torch.int32, device=x.device)
    act = torch.empty((M, IP), dtype=torch.bfloat16, device=x.device)
    offs = seg_end.to(torch.int32)
    for row0 in range(0, M, CHUNK_ROWS):
        n = min(CHUNK_ROWS, M - row0)
        x_aug = torch.empty((n, HP), dtype=torch.bfloat16, device=x.device)
        _gather_rows_kernel[(n, triton.cdiv(HP, block))](x, order, rows, x_aug, row0, H=H, HP=HP, K_ROUTE=k_route,
                                                          BLOCK=block, num_warps=4)
        # each expert's rows within this chunk: its segment end, relative to the chunk, clamped to it
        h = F.grouped_mm(x_aug, w1.transpose(1, 2), offs=(offs - row0).clamp_(0, n))  # (n, 2I)
        _swiglu_rows_kernel[(n, triton.cdiv(IP, block))](h, act[row0:], float(limit), I=I, IP=IP, BLOCK=block,
                                                          num_warps=4)
        del x_aug, h
    del w1
    w2 = dequantize_augmented(mlp2_blocks, mlp2_scales, mlp2_bias)  # (E, H, IP)
    return F.grouped_mm(act, w2.transpose(1, 2), offs=offs), rows  # (M, H) by sorted row


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
