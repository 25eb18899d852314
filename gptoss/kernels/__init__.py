"""Compute kernels. Each op has a pure-PyTorch reference that defines the numerics (and that autograd can
differentiate); fast GPU kernels are drop-in replacements tested against it.

Set GPTOSS_KERNELS=reference to force the references everywhere (the CPU always uses them).
"""

import os


def use_reference() -> bool:
    return os.environ.get("GPTOSS_KERNELS", "auto") == "reference"
