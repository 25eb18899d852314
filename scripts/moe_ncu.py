"""A short run of one MoE path's kernels (20b shapes, N tokens, autotuned) for Nsight Compute to read:

  ncu --clock-control none --profile-from-start off --kernel-name regex:gemv --launch-count 2 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats python scripts/moe_ncu.py [N] [PATH]

PATH: a `moe_triton` path (default gemv; gemm_triton, gemm_mma, gemm_wgmma on sm_90).

The profiler starts after the autotuning calls, so it sees the chosen configs.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moe import make_layers, tokens  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    path = sys.argv[2] if len(sys.argv) > 2 else "gemv"
    layers = make_layers(4, 32, 2880, 2880, "cuda")
    inputs = [tokens(n, 32, 2880, 4, "cuda") for _ in layers]

    def run():
        for (x, w, ids), (m1, b1, m2, b2) in zip(inputs, layers):
            mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path)

    run()  # autotunes
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
