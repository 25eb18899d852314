"""Compute kernels. Each op has a pure-PyTorch reference that defines the numerics (and that autograd can
differentiate); fast GPU kernels are drop-in replacements tested against it.

Set GPTOSS_KERNELS=reference to force the references everywhere (the CPU always uses them).
"""

import functools
import os

import torch


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET, read as Triton reads it): the kernels
    then take fixed launch configs (there is nothing to time) and float32 dot operands."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def cuda_capability(x: torch.Tensor) -> tuple[int, int]:
    """The compute capability (major, minor) of CUDA tensor x's device, queried once per device."""
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())


# Constexpr switches of the Triton kernels that depend on the GPU generation, with the first arch (major * 10 + minor)
# that launches them on: programmatic dependent launch (gptoss.kernels.pdl) and the MoE GEMV's FP4 decode through
# e4m3 conversions (gptoss.kernels.moe_triton). The build checks (tests/test_triton_builds.py,
# scripts/compile_for_arch.py) set them per arch from here, as the GPUs launch them.
ARCH_SWITCHES = {"PDL": 90, "FP8_CVT": 89}


def arch_switch(name: str, arch: int) -> bool:
    """Whether a GPU of arch sm_<arch> launches the kernels with switch `name` (of ARCH_SWITCHES) on."""
    return arch >= ARCH_SWITCHES[name]


def cuda_arch(x: torch.Tensor) -> int:
    """The arch number (major * 10 + minor, as sm_<arch> names it) of CUDA tensor x's device."""
    major, minor = cuda_capability(x)
    return 10 * major + minor


# Set by the kernel tests: intermediate buffers then start as NaN, so an element a kernel fails to write poisons
# its output.
POISON_SCRATCH = False


def scratch(shape, dtype, device) -> torch.Tensor:
    """An intermediate buffer that the kernels write in full before reading it (NaN-filled under POISON_SCRATCH)."""
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def use_reference() -> bool:
    return os.environ.get("GPTOSS_KERNELS", "auto") == "reference"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_device(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can serve on x's device: CUDA, triton installed, references not forced."""
    return x.is_cuda and not use_reference() and _triton_importable()


def use_triton(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether an op on x (with these parameters) runs as a Triton kernel: on a Triton device, and not while
    autograd records x or a parameter (the kernels have no backward: training runs the pure path)."""
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    return triton_device(x) and not recorded
