"""Where the MoE GEMV path stops beating the grouped GEMM as tokens per call grow (the engine decodes 1-64 tokens
per step), and the engine's throughput with the crossover applied.

  python scripts/moe_crossover.py        (H100: about 2 minutes)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_moe import make_layers, tokens  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402


def graphed_us(fn, iters=50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main():
    E, H, I, K = 32, 2880, 2880, 4
    m1, b1, m2, b2 = make_layers(1, E, H, I, "cuda")[0]
    crossover = 0
    print("tokens | gemv us | gemm us", flush=True)
    for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64):
        x, w, ids = tokens(n, E, H, K, "cuda")
        def run(path):
            return mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path)

        gemv, gemm = run("gemv").float(), run("gemm").float()
        agree = float((gemv - gemm).norm() / gemm.norm())
        times = {path: graphed_us(lambda path=path: run(path)) for path in ("gemv", "gemm")}
        print(f"{n:6d} | {times['gemv']:7.1f} | {times['gemm']:7.1f} | relative difference {agree:.1e}", flush=True)
        if times["gemv"] < times["gemm"] and agree < 1e-2:
            crossover = n
    print(f"GEMV is faster up to {crossover} tokens", flush=True)

    from gptoss.bench import bench_engine, random_model

    model = random_model("gpt-oss-20b", "cuda")
    for limit in sorted({mt.DECODE_MAX_TOKENS, crossover}):
        mt.DECODE_MAX_TOKENS = limit
        served = bench_engine(model, 64, prompt_length=1024, output_tokens=256)
        print(f"engine with GEMV up to {limit} tokens: {served['output_tokens_per_s']:,.0f} output tokens/s", flush=True)


if __name__ == "__main__":
    main()
