"""gptoss.bench helpers that run without a GPU (the benchmarks themselves run on the device machine)."""

from types import SimpleNamespace

import pytest

from gptoss.bench import kernel_builds


def test_kernel_builds_records_each_build_and_restores_the_hook():
    knobs = getattr(pytest.importorskip("triton"), "knobs", None)
    if knobs is None:
        pytest.skip("this Triton has no compile hook")
    original, outer = knobs.runtime.jit_cache_hook, []
    knobs.runtime.jit_cache_hook = lambda **kw: outer.append(kw["fn"].name) or False
    try:
        with kernel_builds() as built:
            # Triton calls the hook with these keywords before it compiles a kernel; False lets it compile
            hook_args = dict(key=None, repr="", compile={}, is_manual_warmup=False, already_compiled=False)
            assert knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_mlp1_kernel"), **hook_args) is False
            knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_gemv_kernel"), **hook_args)
        assert built == ["_mlp1_kernel", "_gemv_kernel"]
        assert outer == ["_mlp1_kernel", "_gemv_kernel"]  # a hook set before keeps being called
        knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_after"), **hook_args)
        assert built == ["_mlp1_kernel", "_gemv_kernel"]  # restored on exit
    finally:
        knobs.runtime.jit_cache_hook = original
