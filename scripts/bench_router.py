"""The MoE router's two forms on the GPU: the gate's linear layer (cuBLAS) followed by `route_triton`, against the
fused `router_triton`, per layer call (graphed), for several token counts; then a 1k prefill alternating the two
(wall clock, best of 15), as `gptoss bench` times it.

  python scripts/bench_router.py [--preset gpt-oss-20b] [--tokens 16 64 256 1024 8192]    (H100: ~1 min)
"""

import argparse
import time

import torch
import torch.nn.functional as F
import triton

from gptoss.bench import random_model
from gptoss.config import preset
from gptoss.generate import TokenGenerator
from gptoss.kernels import route_triton as rt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 256, 1024, 8192])
    parser.add_argument("--prefill", type=int, default=1024, help="prefill length for the A/B (0: none)")
    args = parser.parse_args()
    config = preset(args.preset)
    k = config.experts_per_token
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(config.num_experts, config.hidden_size, device="cuda", generator=gen).bfloat16() / 50
    bias = torch.randn(config.num_experts, device="cuda", generator=gen).bfloat16()
    with torch.inference_mode():
        for n in args.tokens:
            x = torch.randn(n, config.hidden_size, device="cuda", generator=gen).bfloat16()
            two = triton.testing.do_bench_cudagraph(lambda: rt.route_triton(F.linear(x, weight, bias), k)) * 1000
            fused = triton.testing.do_bench_cudagraph(lambda: rt.router_triton(x, weight, bias, k)) * 1000
            print(f"{n} tokens, {config.num_experts} experts: cuBLAS + route_triton {two:.2f} us, "
                  f"router_triton {fused:.2f} us", flush=True)
    if not args.prefill:
        return
    n = args.prefill
    model = random_model(args.preset, "cuda")
    generator = TokenGenerator(None, "cuda", context_length=n + 1, model=model)
    tokens = torch.randint(0, 199998, (n,), device="cuda")
    last = torch.tensor([n - 1], device="cuda")
    shipped = rt.ROUTER_MIN_TOKENS
    with torch.inference_mode():
        for _round in range(2):
            for name, threshold in (("cuBLAS + route_triton", n + 1), ("router_triton", shipped)):
                rt.ROUTER_MIN_TOKENS = threshold
                walls = []
                for i in range(18):  # 3 warm-up runs (the first compiles)
                    generator.cache.reset()
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    model(tokens, generator.cache.reserve(n), generator.cache, logits_rows=last)
                    torch.cuda.synchronize()
                    if i >= 3:
                        walls.append(time.perf_counter() - began)
                print(f"prefill of {n} tokens, {name}: {n / min(walls):,.0f} tok/s ({min(walls) * 1e3:.2f} ms)",
                      flush=True)
    rt.ROUTER_MIN_TOKENS = shipped


if __name__ == "__main__":
    main()
