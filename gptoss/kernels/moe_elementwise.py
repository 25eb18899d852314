"""The Triton pieces every MoE kernel shares (`moe_gemv`, `moe_gemm_triton`, `moe_mma`, `moe_wgmma`, `moe_dense`):
MXFP4 decoded in registers from the bits (no lookup table), and the clamped SwiGLU rounded as the pure path rounds.

MXFP4: value = FP4[code] * 2^(scale - 127); the low nibble of byte b is element 2b, the high nibble 2b+1. FP4 values
are built from bits; the E8M0 block scale 2^(s - 127) is the float with exponent field s, applied per 32-element
group.
"""

import os

import triton
import triton.language as tl

from gptoss.kernels.rounding import round_to


def denorm_default() -> bool:
    """FP4 decode form in the GEMM paths: 'denorm' (fewer ops; default) or 'safe' (GPTOSS_MXFP4_DEQUANT=safe)."""
    return os.environ.get("GPTOSS_MXFP4_DEQUANT", "denorm") != "safe"


@triton.jit
def _fp4_code_value(c):
    """c: uint32 codes 0..15 -> FP4 value (float32), branch-free 'safe' form (no subnormals involved)."""
    em = c & 7
    bits = tl.where(em >= 2, (em << 22) + 0x3F000000, em * 0x3F000000)  # 0x3F000000 = 0.5
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def fp4_unscaled(packed, DENORM: tl.constexpr):
    """packed: uint8 bytes (any shape) -> (low, high) float32 FP4 values, block scale not applied:
    element 2b is the low nibble of byte b, element 2b+1 the high nibble.

    DENORM: code (s, e1 e0, m) placed as fp32 bits s | exponent field e | mantissa top bit m is the value
    times 2^-126 (code 1 = 0.5 lands on the subnormal 2^-127), so one multiply by 2^126 finishes it:
    3 integer ops + 1 multiply per element. Needs fp32 subnormals kept (plain fp32 multiplies on NVIDIA GPUs
    keep them; tests check every byte). Otherwise the 'safe' compare/select form is used."""
    p = packed.to(tl.uint32)
    if DENORM:
        lo = ((p << 22) & 0x01C00000) | ((p << 28) & 0x80000000)
        hi = ((p << 18) & 0x01C00000) | ((p << 24) & 0x80000000)
        two126 = 8.507059173023462e37
        return lo.to(tl.float32, bitcast=True) * two126, hi.to(tl.float32, bitcast=True) * two126
    else:
        return _fp4_code_value(p & 15), _fp4_code_value(p >> 4)


@triton.jit
def scale_value(s):
    """uint8 E8M0 scale bytes -> 2^(s - 127) as float32 (s = 0 gives 0 instead of 2^-127)."""
    return (s.to(tl.uint32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def swiglu_rounded(h_glu, h_lin, limit, DT: tl.constexpr):
    """Clamped SwiGLU of float32 mlp1 outputs, rounded as the pure path's torch ops on DT tensors round:
    h (F.linear's output), 1.702 * glu, its sigmoid, glu * sigmoid, lin + 1 and the product each to DT.
    Returns float32 values that DT holds exactly."""
    glu = tl.minimum(round_to(h_glu, DT), limit)
    lin = tl.minimum(tl.maximum(round_to(h_lin, DT), -limit), limit)
    gated = round_to(glu * round_to(tl.sigmoid(round_to(1.702 * glu, DT)), DT), DT)
    return round_to(gated * round_to(lin + 1.0, DT), DT)


@triton.jit
def fp4_pair16(wd, K: tl.constexpr):
    """wd: uint32 words (8 FP4 codes: inputs 8q .. 8q+7) -> float32 values of inputs 8q+K and 8q+4+K,
    without the block scale and times 2^-14: t = wd >> 4K brings both codes to bits 0..3 and 16..19, and
    ((t << 9) & 0x0E000E00) | ((t << 12) & 0x80008000) is the fp16 pair (exponent field e, mantissa top bit
    m, sign); code 1 (0.5) becomes the fp16 subnormal 2^-15, which fp16 -> fp32 keeps exactly."""
    t = wd >> (4 * K)
    v = ((t << 9) & 0x0E000E00) | ((t << 12) & 0x80008000)
    lo = v.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


# FP4 codes -> e4m3 bytes -> fp16 (`cvt.rn.f16x2.e4m3x2`, sm_89+) -> fp32, 8 codes of one word at a time. A code
# (s, e1 e0, m) placed as e4m3 bits s | 00 e1 e0 | m 0 0 is the FP4 value times 2^-6 (code 1, 0.5, lands on the
# e4m3 subnormal 2^-7), exact in fp16 and fp32. Outputs: inputs 0, 2, 4, 6 (low nibbles), then 1, 3, 5, 7.
_FP4_E4M3_OCTET = tl.constexpr("""
{
.reg .b32 a, b, e, o;
.reg .b16 e01, e23, o01, o23, x0, x1, x2, x3, x4, x5, x6, x7;
.reg .b32 h0, h1, h2, h3;
shl.b32 a, $8, 2;
shl.b32 b, $8, 4;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, b, 0x80808080;
or.b32 e, a, b;
shr.b32 a, $8, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, $8, 0x80808080;
or.b32 o, a, b;
mov.b32 {e01, e23}, e;
mov.b32 {o01, o23}, o;
cvt.rn.f16x2.e4m3x2 h0, e01;
cvt.rn.f16x2.e4m3x2 h1, e23;
cvt.rn.f16x2.e4m3x2 h2, o01;
cvt.rn.f16x2.e4m3x2 h3, o23;
mov.b32 {x0, x1}, h0;
mov.b32 {x2, x3}, h1;
mov.b32 {x4, x5}, h2;
mov.b32 {x6, x7}, h3;
cvt.f32.f16 $0, x0;
cvt.f32.f16 $1, x1;
cvt.f32.f16 $2, x2;
cvt.f32.f16 $3, x3;
cvt.f32.f16 $4, x4;
cvt.f32.f16 $5, x5;
cvt.f32.f16 $6, x6;
cvt.f32.f16 $7, x7;
}
""")


@triton.jit
def fp4_octet_e4m3(wd):
    """wd: int32 words (8 FP4 codes: inputs 8q .. 8q+7) -> float32 values of inputs 8q + (0, 2, 4, 6, 1, 3, 5,
    7), times 2^-6, block scale not applied (`_FP4_E4M3_OCTET`)."""
    return tl.inline_asm_elementwise(_FP4_E4M3_OCTET, "=r,=r,=r,=r,=r,=r,=r,=r,r", [wd],
                                     dtype=(tl.float32,) * 8, is_pure=True, pack=1)

