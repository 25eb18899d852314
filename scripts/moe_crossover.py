"""Which MoE kernels are fastest as tokens per call grow (the engine decodes 1-64 tokens per step, prefills
hundreds to thousands): the GEMV (up to 16 tokens), moe_triton's grouped GEMM and the tensor-core grouped GEMM of
gptoss.kernels.moe_mma, each autotuned and timed in a CUDA graph; then the engine's throughput with the
dispatch as shipped (moe_triton.DECODE_MAX_TOKENS, MMA_MAX_TOKENS).

  python scripts/moe_crossover.py        (H200: about 3 minutes)
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
    print("tokens | gemv us | gemm_triton us | gemm_mma us | fastest", flush=True)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        x, w, ids = tokens(n, E, H, K, "cuda")

        def run(path):
            return mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path)

        paths = ["gemv", "gemm_triton", "gemm_mma"] if n <= 16 else ["gemm_triton", "gemm_mma"]
        outs = {path: run(path).float() for path in paths}
        agree = max(float((outs[p] - outs["gemm_triton"]).norm() / outs["gemm_triton"].norm()) for p in paths)
        times = {path: graphed_us(lambda path=path: run(path)) for path in paths}
        cells = " | ".join(f"{times[p]:7.1f}" if p in times else "      -" for p in ("gemv", "gemm_triton", "gemm_mma"))
        print(f"{n:6d} | {cells} | {min(times, key=times.get)} (outputs within {agree:.1e})", flush=True)

    from gptoss.bench import bench_engine, random_model

    model = random_model("gpt-oss-20b", "cuda")
    served = bench_engine(model, 64, prompt_length=1024, output_tokens=256)
    print(f"engine (GEMV up to {mt.DECODE_MAX_TOKENS} tokens, tensor-core GEMM up to {mt.MMA_MAX_TOKENS}): "
          f"{served['output_tokens_per_s']:,.0f} output tokens/s", flush=True)


if __name__ == "__main__":
    main()
