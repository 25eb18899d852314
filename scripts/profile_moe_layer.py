"""Per-kernel GPU time of one MoE layer call (gpt-oss-20b shapes, random packed experts and routing) on a path of
gptoss.kernels.moe_triton, from torch.profiler over five calls: where a path's time goes besides its GEMMs.

  python scripts/profile_moe_layer.py [PATH TOKENS ...]        (default: gemm_dense 8192 gemm 1024 gemm_mma 64)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_moe import kernel_time_ms, make_layers, tokens  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402

E, H, I, K = 32, 2880, 2880, 4


def main():
    args = sys.argv[1:] or ["gemm_dense", "8192", "gemm", "1024", "gemm_mma", "64"]
    (m1, b1, m2, b2), = make_layers(1, E, H, I, "cuda")
    for path, n in zip(args[::2], args[1::2]):
        x, w, ids = tokens(int(n), E, H, K, "cuda")
        residual = torch.randn_like(x)

        def run():
            return mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path,
                                 residual=residual)

        total_ms, heaviest = kernel_time_ms(run, iters=5, top=14)
        print(f"{path}, {n} tokens: {total_ms * 1000:.0f} us of kernels a call", flush=True)
        for name, us in heaviest:
            print(f"  {us:8.1f} us  {name}", flush=True)


if __name__ == "__main__":
    main()
