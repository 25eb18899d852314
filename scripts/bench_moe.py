"""Micro-benchmark: Triton MoE over packed MXFP4 experts (gptoss.kernels.moe_triton) vs the PyTorch reference.

gpt-oss-20b expert shapes (E=32, H=I=2880, K=4), random packed weights on the GPU. Several layers' worth of
weights are allocated and used in turn so that decode timings read the experts from HBM, not from L2.

  python scripts/bench_moe.py [--layers 4] [--quick] [--precompile 12]

Decode: time per layer call (eager, and CUDA-graph replay), kernel-only device time (profiler), and GB/s over the
bytes that must be read (packed blocks + scales + biases of the distinct selected experts). Prefill: TFLOP/s
counting 2 * N * K * (2I*H + H*I) flops.
"""

import argparse
import os
import sys
import time
import traceback

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gptoss.experts import MXFP4Experts
from gptoss.kernels.moe import moe, route
from gptoss.kernels import moe_gemm_triton, moe_gemv
from gptoss.kernels import moe_triton as mt


def log(*a):
    print(*a, flush=True)


def make_layers(L, E, H, I, device):
    layers = []
    for _ in range(L):
        m1, m2 = MXFP4Experts(E, 2 * I, H, device=device), MXFP4Experts(E, H, I, device=device)
        for st in (m1, m2):
            st.blocks.copy_(torch.randint(0, 256, st.blocks.shape, dtype=torch.uint8, device=device))
            st.scales.copy_(torch.randint(118, 125, st.scales.shape, dtype=torch.uint8, device=device))
        b1 = (torch.randn(E, 2 * I, device=device) * 0.5).bfloat16()
        b2 = (torch.randn(E, H, device=device) * 0.5).bfloat16()
        layers.append((m1, b1, m2, b2))
    return layers


def tokens(N, E, H, K, device):
    x = torch.randn(N, H, device=device).bfloat16()
    w, ids = route(torch.randn(N, E, device=device), K)
    return x, w.bfloat16(), ids


def bench(fn, iters=200, warmup=20):
    """median milliseconds per call, timed with CUDA events per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def kernel_time_ms(fn, iters=50, top=6):
    """mean device time per call summed over all kernels launched (torch profiler), and the `top` kernels' names
    with their microseconds per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name] = per_kernel.get(ev.name, 0.0) + ev.device_time_total
    total = sum(per_kernel.values()) / iters / 1000.0
    heaviest = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return total, [(name[:60], v / iters) for name, v in heaviest]


def expert_bytes(ids, E, H, I):
    u = torch.unique(ids).numel()
    per = (2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 2) + (H * I // 2 + H * I // 32 + H * 2)
    return u, u * per


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tuning_table(k):
    """autotuner k's per-config kernel times (ms) for its last key, best first"""
    timings = getattr(k, "configs_timings", None) or {}
    rows = []
    for cfg, t in timings.items():
        t = t[0] if isinstance(t, (list, tuple)) else t
        rows.append((float(t), f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"))
    return sorted(rows)


_WARM_LAYERS: dict = {}


def _compile_one(task):
    """(E, H, I, N, path, config): one fixed-config call, which fills triton's on-disk cache with the kernels the
    autotuner will compile for the same shapes (the same specialization)."""
    E, H, I, N, path, config = task
    key = (E, H, I)
    if key not in _WARM_LAYERS:
        _WARM_LAYERS[key] = make_layers(1, E, H, I, "cuda")[0]
    m1, b1, m2, b2 = _WARM_LAYERS[key]
    x, w, ids = tokens(N, E, H, 4, "cuda")
    try:
        mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path, config=config)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # an autotune candidate that does not fit is skipped by the autotuner too
        return f"{task[:5]} {config}: {type(exc).__name__} {str(exc)[:100]}"


def precompile(workers):
    """Compile every autotune candidate (both kernels of each path, the bench's and the tests' shapes) in parallel
    processes: the autotuner itself compiles one config after another."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    tasks = []
    for E, H, I in [(32, 2880, 2880), (8, 256, 128)]:
        for c in moe_gemv._gemv_configs("BLOCK_H", False):
            tasks.append((E, H, I, 1, "gemv", dict(c.kwargs, BLOCK_U=c.kwargs["BLOCK_H"] // 2, num_warps=c.num_warps)))
        c1s, c2s = moe_gemm_triton._dot_configs(True), moe_gemm_triton._dot_configs(False)
        for c in c1s + c2s:  # a fixed config runs both GEMM kernels with it
            tasks.append((E, H, I, 128, "gemm", dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)))
    t0 = time.time()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for r in ex.map(_compile_one, tasks):
            if r:
                log(f"precompile: {r}")
    log(f"precompiled {len(tasks)} candidate launches with {workers} processes in {time.time() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precompile", type=int, default=0, metavar="PROCS",
                    help="compile the autotune candidates first in PROCS parallel processes")
    args = ap.parse_args()
    dev = "cuda"
    E, H, I, K = 32, 2880, 2880, 4
    torch.manual_seed(0)
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.precompile:
        precompile(args.precompile)

    # HBM copy ceiling, for reference
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), iters=20, warmup=3)
    log(f"copy 1 GiB: {ms:.3f} ms -> {2 * a.numel() / ms / 1e6:.0f} GB/s (read + write)")
    del a, b

    layers = make_layers(args.layers, E, H, I, dev)
    summary = []  # (section, variant, text)

    # ---------------- decode ----------------
    gemv_variants = [("auto", {})] + [
        (f"U{c.kwargs['BLOCK_H'] // 2} H{c.kwargs['BLOCK_H']} K{c.kwargs['BLOCK_K']} w{c.num_warps}",
         dict(config=dict(c.kwargs, BLOCK_U=c.kwargs["BLOCK_H"] // 2, num_warps=c.num_warps)))
        for c in moe_gemv._gemv_configs("BLOCK_H", False)]
    for N in ([1] if args.quick else [1, 4, 8]):
        xs = [tokens(N, E, H, K, dev) for _ in layers]
        nbytes = [expert_bytes(ids, E, H, I) for (_, _, ids) in xs]
        avg_bytes = sum(bb for _, bb in nbytes) / len(nbytes)
        avg_u = sum(u for u, _ in nbytes) / len(nbytes)
        variants = gemv_variants if N == 1 else gemv_variants[:1]
        for variant, kw in variants:
            kw = dict(path="gemv", **kw)
            try:
                state = {"i": 0}

                def call(kw=kw):
                    li = state["i"] % len(layers)
                    state["i"] += 1
                    m1, b1, m2, b2 = layers[li]
                    x, w, ids = xs[li]
                    return mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, **kw)

                # correctness on this shape
                m1, b1, m2, b2 = layers[0]
                x, w, ids = xs[0]
                err = rel(mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, **kw),
                          moe(x, w, ids, m1, b1, m2, b2, 7.0))
                eager = bench(call)
                # CUDA graph: one graph per layer, replayed in turn
                graphs, outs = [], []
                for li in range(len(layers)):
                    state["i"] = li
                    call()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    state["i"] = li
                    with torch.cuda.graph(g):
                        outs.append(call())
                    graphs.append(g)
                gs = {"i": 0}

                def replay():
                    graphs[gs["i"] % len(graphs)].replay()
                    gs["i"] += 1

                graph_ms = bench(replay, iters=400)
                ktot, top = kernel_time_ms(call)
                log(f"decode N={N} {variant:18s} err={err:.2e} experts={avg_u:.1f} bytes={avg_bytes / 1e6:.1f} MB | "
                    f"eager {eager * 1e3:.1f} us | graph {graph_ms * 1e3:.1f} us -> {avg_bytes / graph_ms / 1e6:.0f} GB/s"
                    f" | kernels {ktot * 1e3:.1f} us -> {avg_bytes / ktot / 1e6:.0f} GB/s")
                for name, us in top:
                    log(f"      {us:8.1f} us  {name}")
                summary.append((f"decode N={N}", variant, f"graph {graph_ms * 1e3:6.1f} us {avg_bytes / graph_ms / 1e6:5.0f} GB/s"
                                f" | kernels {ktot * 1e3:6.1f} us {avg_bytes / ktot / 1e6:5.0f} GB/s | err {err:.1e}"))
            except Exception:
                log(f"decode N={N} {variant} FAILED")
                traceback.print_exc(file=sys.stdout)
                summary.append((f"decode N={N}", variant, "FAILED"))
        if N == 1:
            for name in ("mlp1_gemv", "mlp2_gemv"):
                tuner = moe_gemv._TUNED.get(name)
                log(f"autotuned {name}: {getattr(tuner, 'best_config', None)}")
                for t, cfg in tuning_table(tuner):
                    log(f"      {t * 1e3:8.1f} us  {cfg}")
        try:
            state = {"i": 0}

            def ref_call():
                li = state["i"] % len(layers)
                state["i"] += 1
                m1, b1, m2, b2 = layers[li]
                x, w, ids = xs[li]
                return moe(x, w, ids, m1, b1, m2, b2, 7.0)

            log(f"decode N={N} reference eager {bench(ref_call, iters=10, warmup=2) * 1e3:.1f} us")
        except Exception:
            traceback.print_exc(file=sys.stdout)

    # ---------------- prefill ----------------
    prefill_variants = [("auto", {}), ("BM128 BN32 BK128 w4 s4 (old best)",
                                       dict(config=dict(BM=128, BN=32, BK=128, num_warps=4, num_stages=4)))]
    for N in ([1024] if args.quick else [1024, 8192]):
        x, w, ids = tokens(N, E, H, K, dev)
        m1, b1, m2, b2 = layers[0]
        flops = 2 * N * K * (2 * I * H + H * I)
        ref = moe(x, w, ids, m1, b1, m2, b2, 7.0)
        for variant, kw in prefill_variants:
            kw = dict(path="gemm", **kw)
            try:
                t0 = time.time()
                out = mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, **kw)
                torch.cuda.synchronize()
                log(f"prefill N={N} {variant}: first call (compile / autotune) {time.time() - t0:.1f} s")
                err = rel(out, ref)
                fn = lambda: mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0,  # noqa
                                           **kw)
                ms = bench(fn, iters=20, warmup=3)
                ktot, top = kernel_time_ms(fn, iters=5)
                log(f"prefill N={N} {variant} err={err:.2e}: {ms:.3f} ms -> {flops / ms / 1e9:.0f} TFLOP/s "
                    f"(kernels {ktot:.3f} ms -> {flops / ktot / 1e9:.0f} TFLOP/s)")
                for name, us in top:
                    log(f"      {us:9.1f} us  {name}")
                summary.append((f"prefill N={N}", variant, f"{ms:7.3f} ms {flops / ms / 1e9:4.0f} TFLOP/s | kernels "
                                f"{ktot:7.3f} ms {flops / ktot / 1e9:4.0f} TFLOP/s | err {err:.1e}"))
            except Exception:
                log(f"prefill N={N} {variant} FAILED")
                traceback.print_exc(file=sys.stdout)
                summary.append((f"prefill N={N}", variant, "FAILED"))
        for name in ("mlp1_bf16", "mlp2_bf16"):  # the Triton GEMM's tuners for bf16 activations
            tuner = moe_gemm_triton._TUNED.get(name)
            log(f"autotuned {name} (N={N}): {getattr(tuner, 'best_config', None)}")
            for t, cfg in tuning_table(tuner):
                log(f"      {t * 1e3:9.1f} us  {cfg}")
        if N == 1024:
            ref_ms = bench(lambda: moe(x, w, ids, m1, b1, m2, b2, 7.0), iters=3, warmup=1)
            log(f"prefill N={N} reference: {ref_ms:.3f} ms -> {flops / ref_ms / 1e9:.0f} TFLOP/s")

    log("\n==== summary (decode: per layer call, CUDA graph replay; prefill: eager per layer call) ====")
    for section, variant, text in summary:
        log(f"{section:14s} {variant:36s} {text}")


if __name__ == "__main__":
    main()
