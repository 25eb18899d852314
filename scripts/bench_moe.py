"""Micro-benchmark: Triton MoE over packed MXFP4 experts (gptoss.kernels.moe_triton) vs the PyTorch reference.

gpt-oss-20b expert shapes (E=32, H=I=2880, K=4), random packed weights on the GPU. Several layers' worth of
weights are allocated and used in turn so that decode timings read the experts from HBM, not from L2.

  python scripts/bench_moe.py [--layers 4] [--quick]

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gptoss.experts import MXFP4Experts
from gptoss.kernels.moe import moe, route
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


def kernel_time_ms(fn, iters=50):
    """mean device time per call summed over all kernels launched (torch profiler)."""
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
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:6]
    return total, [(name[:60], v / iters) for name, v in top]


def expert_bytes(ids, E, H, I):
    u = torch.unique(ids).numel()
    per = (2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 2) + (H * I // 2 + H * I // 32 + H * 2)
    return u, u * per


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    E, H, I, K = 32, 2880, 2880, 4
    torch.manual_seed(0)
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {mt.triton.__version__}")

    # HBM copy ceiling, for reference
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), iters=20, warmup=3)
    log(f"copy 1 GiB: {ms:.3f} ms -> {2 * a.numel() / ms / 1e6:.0f} GB/s (read + write)")
    del a, b

    layers = make_layers(args.layers, E, H, I, dev)

    # ---------------- decode ----------------
    for N in ([1] if args.quick else [1, 4, 8]):
        xs = [tokens(N, E, H, K, dev) for _ in layers]
        nbytes = [expert_bytes(ids, E, H, I) for (_, _, ids) in xs]
        avg_bytes = sum(bb for _, bb in nbytes) / len(nbytes)
        avg_u = sum(u for u, _ in nbytes) / len(nbytes)
        variants = [("gemv/w32", dict(path="gemv", gemv_form="w32")),
                    ("gemv/w32c", dict(path="gemv", gemv_form="w32c")),
                    ("gemv/w32p", dict(path="gemv", gemv_form="w32p")),
                    ("gemv/w32d", dict(path="gemv", gemv_form="w32d")),
                    ("gemv/denorm", dict(path="gemv", gemv_form="denorm")),
                    ("gemv/safe", dict(path="gemv", gemv_form="safe")),
                    ("gemm", dict(path="gemm"))]
        if N == 1 and not args.quick:
            for form in ("w32", "w32c", "w32p"):
                for bu, bk, nw in [(16, 256, 4), (32, 256, 8), (16, 512, 4), (8, 256, 2), (16, 128, 4)]:
                    variants.append((f"{form} U{bu} K{bk} w{nw}", dict(path="gemv", gemv_form=form, config=dict(
                        BLOCK_U=bu, BLOCK_H=2 * bu, BLOCK_K=bk, num_warps=nw))))
        if N > 1 and not args.quick:
            variants = variants[:3] + [("gemm", dict(path="gemm"))]
        for variant, kw in variants:
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
            except Exception:
                log(f"decode N={N} {variant} FAILED")
                traceback.print_exc(file=sys.stdout)
        try:
            state = {"i": 0}

            def ref_call():
                li = state["i"] % len(layers)
                state["i"] += 1
                m1, b1, m2, b2 = layers[li]
                x, w, ids = xs[li]
                return moe(x, w, ids, m1, b1, m2, b2, 7.0)

            log(f"decode N={N} reference eager {bench(ref_call, iters=30, warmup=3) * 1e3:.1f} us")
        except Exception:
            traceback.print_exc(file=sys.stdout)

    for name in ("mlp1_gemv", "mlp2_gemv"):
        k = mt._TUNED.get(name)
        log(f"autotuned {name}: {getattr(k, 'best_config', None)}")

    # ---------------- prefill ----------------
    for N in ([1024] if args.quick else [1024, 8192]):
        x, w, ids = tokens(N, E, H, K, dev)
        m1, b1, m2, b2 = layers[0]
        flops = 2 * N * K * (2 * I * H + H * I)
        try:
            t0 = time.time()
            out = mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0)
            torch.cuda.synchronize()
            log(f"prefill N={N}: first call (autotune) {time.time() - t0:.1f} s")
            ref = moe(x, w, ids, m1, b1, m2, b2, 7.0)
            err = rel(out, ref)
            for dn in (True, False):
                ms = bench(lambda: mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0,
                                                 denorm=dn), iters=20, warmup=3)
                ktot, top = kernel_time_ms(lambda: mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks,
                                                                 m2.scales, b2, 7.0, denorm=dn), iters=5)
                log(f"prefill N={N} denorm={dn} err={err:.2e}: {ms:.3f} ms -> {flops / ms / 1e9:.0f} TFLOP/s "
                    f"(kernels {ktot:.3f} ms -> {flops / ktot / 1e9:.0f} TFLOP/s)")
                for name, us in top:
                    log(f"      {us:9.1f} us  {name}")
            ref_ms = bench(lambda: moe(x, w, ids, m1, b1, m2, b2, 7.0), iters=5, warmup=1)
            log(f"prefill N={N} reference: {ref_ms:.3f} ms -> {flops / ref_ms / 1e9:.0f} TFLOP/s")
        except Exception:
            log(f"prefill N={N} FAILED")
            traceback.print_exc(file=sys.stdout)
    for name in ("mlp1_dot", "mlp2_dot"):
        k = mt._TUNED.get(name)
        log(f"autotuned {name}: {getattr(k, 'best_config', None)}")


if __name__ == "__main__":
    main()
