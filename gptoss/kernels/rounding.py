"""Rounding to the activation dtype inside Triton kernels, at the points where the pure path's torch ops round.

The fast path must compute the pure path's function, rounding included: a kernel that keeps float32 where torch
rounds each op's result to bf16 differs from it in about half of all elements by up to half an ulp, and over 24
layers that noise grows to the size of the whole bf16-vs-float32 difference.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(v, DT: tl.constexpr):
    """float32 v rounded to DT (the activation dtype) to nearest even, returned as float32 (a no-op for float32).
    bfloat16 is rounded on the bits (exact for finite values and infinities; NaN stays NaN): Triton 3.6's
    interpreter truncates a float32 -> bfloat16 cast, which would make the CPU runs of the kernels round
    differently."""
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN's bits would carry into the sign
    else:
        return v.to(DT).to(tl.float32)
