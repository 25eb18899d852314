"""Programmatic dependent launch (PDL, sm_90 and later) for the kernels of a decode step.

A decode step is a chain of ~11 short kernels a layer; between two of them the GPU idles while the next kernel
launches and ramps up its memory traffic. A kernel launched with PDL may start while the kernel before it in the
stream is still running: it first reads what no kernel of the step writes (its weights, biases, norm gains), then
waits (`wait_for_prior_kernel`) until the previous kernel has finished and its writes are visible, and only then
reads activations and writes anything. So the weight stream of one kernel starts under the tail of the one before.

Every PDL kernel here lets the next kernel launch only after its own wait (the same call), so at most two
kernels of the chain are in flight and each waits, transitively, for all before it. Kernels not launched with PDL
(torch's) keep the usual stream order; without PDL the wait is a no-op.
"""

import os

import torch
import triton
import triton.language as tl

from gptoss.kernels import arch_switch, cuda_arch, triton_interpreting


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether kernels on x's device launch with PDL: CUDA sm_90+, not under the interpreter, unless GPTOSS_PDL=0."""
    return (x.is_cuda and not triton_interpreting() and os.environ.get("GPTOSS_PDL", "1") != "0"
            and arch_switch("PDL", cuda_arch(x)))


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel in the stream has finished (its writes visible), then let the next
    kernel launch. Everything before this call may read only data that no kernel of the step writes."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
