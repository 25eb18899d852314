"""Where a batch-1 prefill's time goes on the GPU, and what the pair grouping's chunk size does to it: the grouping
of a prefill's (token, expert) pairs timed alone for each chunk size, then the prefill timed as `gptoss bench` times
it (wall clock, best of 15) and by CUDA events, alternating the chunk sizes, then the per-kernel CUDA time of one
prefill with the shipped chunk size.

  python scripts/profile_prefill.py [--preset gpt-oss-20b] [--tokens 1024] [--chunks 32768 4096]    (H100: ~2 min)
"""

import argparse
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from gptoss.bench import random_model
from gptoss.generate import TokenGenerator
from gptoss.kernels import moe_triton


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32768, 4096],
                        help="values of moe_triton.GROUP_CHUNK_ONEHOT to compare (one-hot entries a chunk)")
    args = parser.parse_args()
    shipped = moe_triton.GROUP_CHUNK_ONEHOT
    model = random_model(args.preset, "cuda")
    config, n = model.config, args.tokens
    pairs = torch.randint(0, config.num_experts, (n * config.experts_per_token,), device="cuda", dtype=torch.int32)
    for chunk in args.chunks:
        moe_triton.GROUP_CHUNK_ONEHOT = chunk
        us = triton.testing.do_bench_cudagraph(lambda: moe_triton.group_pairs(pairs, config.num_experts)) * 1000
        print(f"group_pairs, {pairs.numel()} pairs of {config.num_experts} experts, chunks of {chunk} one-hot "
              f"entries: {us:.2f} us", flush=True)

    generator = TokenGenerator(None, "cuda", context_length=n + 1, model=model)
    tokens = torch.randint(0, 199998, (n,), device="cuda")
    last = torch.tensor([n - 1], device="cuda")  # as `gptoss bench`: only the last row's logits

    def prefill():
        generator.cache.reset()
        model(tokens, generator.cache.reserve(n), generator.cache, logits_rows=last)

    with torch.inference_mode():
        for _round in range(2):
            for chunk in args.chunks:
                moe_triton.GROUP_CHUNK_ONEHOT = chunk
                for _ in range(3):  # autotuning and warm-up
                    prefill()
                walls, gpu = [], []
                for _ in range(15):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    start.record()
                    prefill()
                    end.record()
                    torch.cuda.synchronize()
                    walls.append(time.perf_counter() - began)
                    gpu.append(start.elapsed_time(end) / 1000)
                print(f"prefill of {n} tokens, chunks of {chunk}: {n / min(walls):,.0f} tok/s "
                      f"(wall {min(walls) * 1e3:.2f} ms, CUDA events {min(gpu) * 1e3:.2f} ms)", flush=True)
        moe_triton.GROUP_CHUNK_ONEHOT = shipped
        prefill()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
