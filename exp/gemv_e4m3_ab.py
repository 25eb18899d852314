"""Branch exp-gemv-e4m3: the MoE GEMV's FP4 decode through e4m3 conversions (GPTOSS_EXP_FP8CVT=1: 8 codes a word
placed as e4m3 bytes, `cvt.rn.f16x2.e4m3x2`, then fp32) against the shipped bit arithmetic; 20b shapes at 1, 2 and 4
tokens, 6 layers cycled (reads from HBM), CUDA-graph timed, us a layer call, three rounds alternating, and the
largest difference between the two outputs (must be 0: the same fp32 weights, the same sums).
On sm_90 (nvdisasm of the 4-warp 32 x 512 tiles) the variant has 1,312 SASS instructions against 1,424 for mlp1.
Usage: PYTHONPATH=. python exp/gemv_e4m3_ab.py"""
import os
import sys

sys.path.insert(0, "scripts")
from bench_moe import make_layers, tokens  # noqa: E402
from moe_crossover import graphed_us  # noqa: E402

import gptoss.kernels.moe_triton as mt  # noqa: E402

E, H, I, K, L = 32, 2880, 2880, 4, 6
layers = make_layers(L, E, H, I, "cuda")
for n in (1, 2, 4):
    x, w, ids = tokens(n, E, H, K, "cuda")

    def run():
        return [mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path="gemv")
                for m1, b1, m2, b2 in layers]
    outs, times = {}, {"0": [], "1": []}
    for _ in range(3):
        for v in ("0", "1"):
            os.environ["GPTOSS_EXP_FP8CVT"] = v
            outs[v] = run()
            times[v].append(graphed_us(run) / L)
    os.environ["GPTOSS_EXP_FP8CVT"] = "0"
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs["0"], outs["1"]))
    print(f"tokens {n}: shipped {' / '.join(f'{t:.1f}' for t in times['0'])} us, e4m3 "
          f"{' / '.join(f'{t:.1f}' for t in times['1'])} us a layer call; max diff {diff:.1e}", flush=True)
