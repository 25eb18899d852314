"""The Gluon tensor-core MoE GEMMs build for every GPU they claim to serve: gptoss.kernels.moe_mma for sm_80+,
gptoss.kernels.moe_wgmma for sm_90.

Triton compiles for a CUDA target without a GPU (its wheel ships ptxas), so this runs on the CPU: both kernels of
the 20b shapes, through PTX and ptxas, for Ampere, Ada and Hopper. It guards issue #3 point 6 (no sm_90-only
instruction without a fallback): `mul.bf16x2`, for one, exists only from sm_90 and broke the sm_80 build once.
The kernels' numerics are tested on the GPU (tests/test_moe_triton.py). The builds run in a child process because
the CPU test session puts Triton in interpreter mode, which compiles nothing.
"""

import sys

import pytest

H = I = 2880  # gpt-oss-20b and -120b
HP = 2944  # rounded up to 128 (moe_wgmma's k steps)
POINTERS = {"x_ptr": "*bf16", "xp_ptr": "*bf16", "act_ptr": "*bf16", "order_ptr": "*i32", "seg_ptr": "*i32",
            "w_ptr": "*i32", "s_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16"}
SCALARS = {"E": "i32", "M": "i32", "N": "i32", "limit": "fp32", "tune_m": "i32"}


def build(kernel, constants: dict, arch: int, warps: int):
    """Compiles a Gluon kernel for sm_<arch> as a launch with 16-byte aligned tensors specializes it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else POINTERS.get(n) or SCALARS[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS}
    compiled = triton_compile(GluonASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})
    assert compiled.asm["cubin"], kernel.__name__
    return compiled


def build_both(arch: int) -> None:
    """Compiles mlp1 and mlp2 with the first tile candidate (with the L2 prefetch) for sm_<arch>; raises on any
    failure."""
    from gptoss.kernels import moe_mma

    R, T, warps = moe_mma._CONFIGS[0]
    tile = dict(R=R, T=T, AHEAD=moe_mma.PREFETCH_STEPS)
    for kernel, constants in ((moe_mma._mlp1_swiglu_mma_kernel, dict(H=H, I=I, K_ROUTE=4, EP=32, **tile)),
                              (moe_mma._mlp2_mma_kernel, dict(H=H, I=I, EP=32, **tile))):
        ptx = build(kernel, constants, arch, warps).asm["ptx"]
        # the MMAs, and the L2 prefetch (an inline-asm hint whose result nothing reads: it must not be dropped)
        assert "mma.sync.aligned.m16n8k16" in ptx and "prefetch.global.L2" in ptx, kernel.__name__


def build_wgmma() -> None:
    """Compiles the Hopper kernels of gptoss.kernels.moe_wgmma (every tile candidate) for sm_90."""
    from gptoss.kernels import moe_wgmma

    for R, T, warps in moe_wgmma._CONFIGS:
        for kernel, constants in (
                (moe_wgmma._mlp1_swiglu_wgmma_kernel, dict(H=H, HP=HP, I=I, IP=HP, EP=32, K_ROUTE=4, R=R, T=T)),
                (moe_wgmma._mlp2_wgmma_kernel, dict(H=H, I=I, IP=HP, EP=32, R=R, T=T))):
            assert "wgmma.mma_async.sync.aligned" in build(kernel, constants, 90, warps).asm["ptx"], kernel.__name__
    build(moe_wgmma._permute_kernel, dict(H=H, HP=HP, ROWS=16), 90, 4)


def test_wgmma_builds_for_hopper():
    pytest.importorskip("triton")
    from gptoss.kernels import moe_wgmma

    if not moe_wgmma.HAS_WGMMA:
        pytest.skip("this Triton has no Gluon Hopper API (moe_wgmma does not serve)")
    from conftest import run_test_script  # not at import: the child runs this file without the test session

    run_test_script(__file__, "wgmma", timeout=600)


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_builds_for_arch(arch):
    pytest.importorskip("triton")
    from gptoss.kernels import moe_mma

    if not moe_mma.HAS_GLUON:
        pytest.skip("this Triton has no Gluon (moe_mma does not serve)")
    from conftest import run_test_script

    run_test_script(__file__, str(arch), timeout=600)


if __name__ == "__main__":
    if sys.argv[1] == "wgmma":
        build_wgmma()
    else:
        build_both(int(sys.argv[1]))
