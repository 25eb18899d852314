"""Branch exp-wgmma-wsmem: moe_wgmma (the Hopper prefill GEMM) with its packed words staged in shared memory by
cp.async, 2 or 3 steps ahead (GPTOSS_EXP_WSMEM=1, GPTOSS_EXP_WAHEAD), against the shipped form (words loaded into
registers two steps ahead) and the Triton GEMM that prefills run today. Fixed tiles (the autotuner keys on shapes
only), 2 layers cycled in a CUDA graph, us a layer call, two rounds; each variant's largest difference from the
shipped wgmma outputs (must be 0: the same arithmetic in the same order).
Usage: PYTHONPATH=. python exp/wgmma_wsmem_ab.py [N ...]"""
import os
import sys

sys.path.insert(0, "scripts")
from bench_moe import make_layers, tokens  # noqa: E402
from moe_crossover import graphed_us  # noqa: E402

from gptoss.kernels import moe_triton as mt  # noqa: E402

os.environ["GPTOSS_MOE_GEMM"] = "wgmma"
E, H, I, K = 32, 2880, 2880, 4
TILES = [{"R": 128, "T": 128, "num_warps": 8}, {"R": 128, "T": 64, "num_warps": 8}, {"R": 64, "T": 64, "num_warps": 4}]
VARIANTS = [("0", "2"), ("1", "2"), ("1", "3")]  # (GPTOSS_EXP_WSMEM, GPTOSS_EXP_WAHEAD)
layers = make_layers(2, E, H, I, "cuda")
for n in [int(a) for a in sys.argv[1:]] or [1024, 8192]:
    inputs = [tokens(n, E, H, K, "cuda") for _ in layers]

    def run(path, config=None):
        return [mt.moe_triton(x, w, ids, m1.blocks, m1.scales, b1, m2.blocks, m2.scales, b2, 7.0, path=path,
                              config=config) for (x, w, ids), (m1, b1, m2, b2) in zip(inputs, layers)]
    triton_us = [graphed_us(lambda: run("gemm_triton")) / 2 for _ in range(2)]
    print(f"N={n}: Triton GEMM (autotuned) {' / '.join(f'{t:.1f}' for t in triton_us)}", flush=True)
    for tile in TILES:
        os.environ["GPTOSS_EXP_WSMEM"], os.environ["GPTOSS_EXP_WAHEAD"] = VARIANTS[0]
        ref = run("gemm_wgmma", tile)
        times = {v: [] for v in VARIANTS}
        diff = {}
        for _ in range(2):
            for v in VARIANTS:
                os.environ["GPTOSS_EXP_WSMEM"], os.environ["GPTOSS_EXP_WAHEAD"] = v
                diff[v] = max(float((o.float() - r.float()).abs().max())
                              for o, r in zip(run("gemm_wgmma", tile), ref))
                times[v].append(graphed_us(lambda: run("gemm_wgmma", tile)) / 2)
        print(f"N={n} tile {tile['R']}x{tile['T']}x{tile['num_warps']}: " + ", ".join(
            f"wsmem {v[0]} ahead {v[1]}: {' / '.join(f'{t:.1f}' for t in times[v])} (diff {diff[v]:.0e})"
            for v in VARIANTS), flush=True)
    os.environ["GPTOSS_EXP_WSMEM"], os.environ["GPTOSS_EXP_WAHEAD"] = VARIANTS[0]
