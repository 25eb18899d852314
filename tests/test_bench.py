"""gptoss.bench helpers that run without a GPU (the benchmarks themselves run on the device machine)."""

from types import SimpleNamespace

import pytest
import torch

from gptoss.bench import _percentile, bench_engine, kernel_builds


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


def test_percentile_is_the_nearest_rank():
    assert _percentile(list(range(100, 0, -1)), 99) == 99 and _percentile([5.0], 50) == 5.0
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_engine_bench_counts_tokens_and_reports_latencies():
    """bench_engine on a tiny CPU model: every request's tokens counted once, the latencies ordered and within
    the timed run, the step counters those of the timed round alone."""
    from conftest import SMALL, random_model

    model = random_model(SMALL, dtype=torch.float32)
    result = bench_engine(model, 3, prompt_length=12, output_tokens=5)
    assert result["output_tokens"] == 15 and result["output_tokens_per_s"] == pytest.approx(15 / result["seconds"])
    assert 0 < result["ttft_ms_median"] <= result["ttft_ms_p99"] <= 1e3 * result["seconds"]
    assert 0 < result["itl_ms_median"] <= result["itl_ms_p99"] <= 1e3 * result["seconds"]
    assert result["prefill_tokens"] == 36 and result["decode_tokens"] == 12
