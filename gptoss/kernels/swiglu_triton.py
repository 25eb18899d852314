"""The clamped SwiGLU inside the MoE kernels (CUDA-core GEMV, tensor-core GEMV, grouped GEMM), rounded as the pure
path (gptoss.kernels.moe.swiglu) rounds it."""

import triton
import triton.language as tl

from gptoss.kernels.moe import SWIGLU_ALPHA
from gptoss.kernels.rounding import round_to

_ALPHA = tl.constexpr(SWIGLU_ALPHA)


@triton.jit
def swiglu_rounded(h_glu, h_lin, limit, DT: tl.constexpr):
    """Clamped SwiGLU of float32 mlp1 outputs, rounded as the pure path's torch ops on DT tensors round:
    h (F.linear's output), alpha * glu, its sigmoid, glu * sigmoid, lin + 1 and the product each to DT.
    Returns float32 values that DT holds exactly."""
    glu = tl.minimum(round_to(h_glu, DT), limit)
    lin = tl.minimum(tl.maximum(round_to(h_lin, DT), -limit), limit)
    gated = round_to(glu * round_to(tl.sigmoid(round_to(glu * _ALPHA, DT)), DT), DT)
    return round_to(gated * round_to(lin + 1.0, DT), DT)
