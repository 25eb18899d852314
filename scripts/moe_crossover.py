"""Which MoE kernels are fastest as tokens per call grow (the engine decodes 1-64 tokens per step, prefills
hundreds to thousands): the GEMV (up to 16 tokens), moe_triton's grouped GEMM and the tensor-core grouped GEMMs of
gptoss.kernels.moe_mma and (on Hopper, from 16 tokens) gptoss.kernels.moe_wgmma, above MMA_MAX_TOKENS the
dequantizing grouped GEMM of gptoss.kernels.moe_dense, each autotuned and timed in a CUDA graph; then the engine's
throughput with the dispatch as shipped (moe_triton.DECODE_MAX_TOKENS, MMA_MAX_TOKENS).

  python scripts/moe_crossover.py [--sizes 256 1024 ...] [--no-engine]        (H200: about 3 minutes)
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_moe import make_layers, tokens  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402
from gptoss.kernels.moe_dense import MIN_ROWS_PER_EXPERT  # noqa: E402


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
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                                                 8192])
    parser.add_argument("--no-engine", action="store_true")
    args = parser.parse_args()
    E, H, I, K = 32, 2880, 2880, 4
    m1, b1, m2, b2 = make_layers(1, E, H, I, "cuda")[0]
    columns = ("gemv", "gemm_triton", "gemm_mma", "gemm_wgmma", "gemm_dense")
    wgmma = mt._wgmma_gemm_serves(torch.empty(1, H, device="cuda", dtype=torch.bfloat16), m1.scales, m2.scales)
    print("tokens | " + " | ".join(f"{c} us" for c in columns) + " | fastest", flush=True)
    for n in args.sizes:
        x, w, ids = tokens(n, E, H, K, "cuda")

        def run(path):
            return mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path)

        paths = ["gemv", "gemm_triton", "gemm_mma"] if n <= 16 else ["gemm_triton", "gemm_mma"]
        paths += ["gemm_wgmma"] if wgmma and n >= 16 else []
        paths += ["gemm_dense"] if n > mt.MMA_MAX_TOKENS and mt._dense_gemm_serves(x) else []
        outs = {path: run(path).float() for path in paths}
        agree = max(float((outs[p] - outs["gemm_triton"]).norm() / outs["gemm_triton"].norm()) for p in paths)
        times = {path: graphed_us(lambda path=path: run(path)) for path in paths}
        cells = " | ".join(f"{times[p]:7.1f}" if p in times else "      -" for p in columns)
        print(f"{n:6d} | {cells} | {min(times, key=times.get)} (outputs within {agree:.1e})", flush=True)

    if args.no_engine:
        return
    from gptoss.bench import bench_engine, random_model

    model = random_model("gpt-oss-20b", "cuda")
    served = bench_engine(model, 64, prompt_length=1024, output_tokens=256)
    print(f"engine (GEMV up to {mt.DECODE_MAX_TOKENS} tokens, tensor-core GEMM up to {mt.MMA_MAX_TOKENS}, dense "
          f"GEMM on Hopper from {MIN_ROWS_PER_EXPERT} rows an expert): "
          f"{served['output_tokens_per_s']:,.0f} output tokens/s", flush=True)


if __name__ == "__main__":
    main()
