"""Sweep of tile shapes for the MoE grouped GEMM, one fixed config for both kernels against the autotuned pair.
Prints the graphed time of one layer call per tile and the best, next to the autotuned choice.

  --kernel triton (default: moe_triton's own GEMM, tiles (BM, BN, BK, SWAP, SCALED, warps, stages)), mma or wgmma
  (the tensor-core kernels of gptoss.kernels.moe_mma / moe_wgmma, tiles (R, T, warps)); each tile's output is
  checked against another kernel's autotuned output (relative error printed).

  --sizes decode (default: 32 and 64 tokens, batched decode: every expert holds a handful of rows, so each call
  streams nearly all experts' packed bytes once and is bound by reading and decoding them);
  --sizes prefill (1,024 tokens: ~128 rows an expert, bound by the MMAs and the in-register decode).

  python scripts/moe_tiles.py [--sizes decode|prefill]
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moe import make_layers, tokens  # noqa: E402
from moe_crossover import graphed_us  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402

E, H, I, K = 32, 2880, 2880, 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", choices=["decode", "prefill"], default="decode")
    parser.add_argument("--kernel", choices=["triton", "mma", "wgmma"], default="triton")
    args = parser.parse_args()
    path, other = {"triton": ("gemm_triton", "gemm_mma"), "mma": ("gemm_mma", "gemm_triton"),
                   "wgmma": ("gemm_wgmma", "gemm_triton")}[args.kernel]
    layers = make_layers(4, E, H, I, "cuda")
    expert_bytes = sum(t.numel() * t.element_size() for t in (layers[0][0].blocks, layers[0][0].scales,
                                                              layers[0][2].blocks, layers[0][2].scales))
    # (BM, BN, BK, SWAP, SCALED, warps, stages)
    if args.sizes == "decode":  # dot_scaled tiles near the autotuner's pick, and plain tl.dot tiles with the
        # weights as the MMA's first operand (SWAP) against 16-token tiles
        sizes = [32, 64]
        grid = [(16, 64, 128, False, True, 4, 3), (16, 64, 128, False, True, 4, 4), (16, 64, 64, False, True, 4, 4),
                (16, 32, 128, False, True, 4, 3), (16, 64, 128, False, True, 2, 3)]
        grid += [(16, bn, bk, True, False, warps, 3) for bn, bk in itertools.product([32, 64, 128], [64, 128])
                 for warps in (4, 8)]
    else:  # dot_scaled tiles of 64-128 rows
        sizes = [1024, 8192]
        grid = [(bm, bn, 128, False, True, warps, stages) for bm, bn in itertools.product([64, 128], [64, 128, 256])
                for warps, stages in [(4, 3), (8, 3), (8, 4)]]
    if args.kernel == "mma":
        from gptoss.kernels.moe_mma import _CONFIGS
        grid = _CONFIGS
    elif args.kernel == "wgmma":
        from gptoss.kernels.moe_wgmma import _CONFIGS
        grid = _CONFIGS
    for n in sizes:
        inputs = [tokens(n, E, H, K, "cuda") for _ in layers]

        def call(config=None, kernel=path):
            def run():
                return [mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0,
                                      path=kernel, config=config)
                        for (x, w, ids), (m1, b1, m2, b2) in zip(inputs, layers)]
            return run

        ref = call(kernel=other)()

        def rel_err(outs):
            return max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, ref))

        auto = graphed_us(call()) / len(layers)
        flops = 2 * n * K * (2 * I * H + H * I)
        print(f"N={n}: autotuned {auto:.0f} us a layer call ({expert_bytes / auto / 1e6:.2f} TB/s over all experts, "
              f"{flops / auto / 1e6:.0f} TFLOP/s)", flush=True)
        print(f"  autotuned against the {other} kernel: relative error {rel_err(call()()):.2e}", flush=True)
        results = []
        for tile in grid:
            if args.kernel in ("mma", "wgmma"):
                config = dict(zip(("R", "T", "num_warps"), tile))
            else:
                config = dict(zip(("BM", "BN", "BK", "SWAP", "SCALED", "num_warps", "num_stages"), tile))
            try:
                err = rel_err(call(config)())
                us = graphed_us(call(config)) / len(layers)
            except Exception as e:  # out of shared memory or registers for this tile
                print(f"  {config}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            results.append((us, config))
            print(f"  {config}: {us:.0f} us ({flops / us / 1e6:.0f} TFLOP/s), relative error {err:.2e}", flush=True)
        us, config = min(results, key=lambda r: r[0])
        print(f"N={n}: best {us:.0f} us ({expert_bytes / us / 1e6:.2f} TB/s) with {config}; autotuned {auto:.0f}",
              flush=True)


if __name__ == "__main__":
    main()
