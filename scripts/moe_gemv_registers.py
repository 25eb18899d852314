"""The MoE GEMV kernels under register caps (Triton's maxnreg). Nsight Compute reads 120-168 registers a thread for
the autotuned tiles (scripts/moe_gemv_ncu.py), which caps occupancy at 19-25% of the warp slots; a cap trades
spills for warps. Prints the graphed time of a layer call (N tokens, 20b shapes) per (tile, cap), and its error
against the uncapped tile.

  python scripts/moe_gemv_registers.py [N]
"""

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moe import make_layers, tokens  # noqa: E402
from moe_crossover import graphed_us  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402


def use_tile(rows: int, block_k: int, warps: int, cap: int | None) -> None:
    """The GEMV kernels with one config each (a single config: no tuning) in place of the autotuned ones."""
    for name, kernel, size in (("mlp1_gemv", mt._mlp1_swiglu_gemv_kernel, {"BLOCK_U": rows // 2}),
                               ("mlp2_gemv", mt._mlp2_gemv_kernel, {"BLOCK_H": rows})):
        config = triton.Config({**size, "BLOCK_K": block_k}, num_warps=warps, num_stages=1, maxnreg=cap)
        mt._TUNED[name] = triton.autotune([config], key=["H", "I"])(kernel)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    layers = make_layers(4, 32, 2880, 2880, "cuda")
    inputs = [tokens(n, 32, 2880, 4, "cuda") for _ in layers]

    def run():
        return [mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path="gemv")
                for (x, w, ids), (m1, b1, m2, b2) in zip(inputs, layers)]

    for rows, block_k, warps in [(32, 256, 2), (32, 256, 4), (32, 512, 4), (16, 512, 4)]:
        expected = None
        for cap in (None, 128, 96, 72):
            use_tile(rows, block_k, warps, cap)
            try:
                out = torch.cat(run()).float()
                us = graphed_us(run) / len(layers)
            except Exception as exc:  # a cap too low for the tile
                print(f"rows {rows} BLOCK_K {block_k} warps {warps} maxnreg {cap}: failed ({type(exc).__name__})")
                continue
            expected = out if expected is None else expected
            error = float((out - expected).norm() / expected.norm())
            print(f"rows {rows:3d} BLOCK_K {block_k} warps {warps} maxnreg {str(cap):4s}: {us:6.1f} us a layer call "
                  f"(difference from uncapped {error:.1e})", flush=True)


if __name__ == "__main__":
    main()
