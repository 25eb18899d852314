"""Micro-benchmark: the decode step's dense projections (gpt-oss-20b shapes, 1 token) through the Triton GEMV
(every tile config, and the autotuned pick) against cuBLAS (F.linear). Several copies of each weight are cycled so
that reads come from HBM, not L2; one row times the autotuned GEMV on a single copy instead (the weight resident in
L2 where it fits: what prefetching it into L2 under the step's small kernels could buy at most).
Usage: python scripts/bench_linear.py"""

import torch
import torch.nn.functional as F
import triton

from gptoss.kernels.linear_triton import _configs, gemv

SHAPES = {"qkv (+norm)": (5120, 2880, True), "out": (2880, 4096, False), "gate": (32, 2880, False),
          "unembedding": (201088, 2880, False)}
COPIES = 8


def timed(fn) -> float:
    """microseconds per call, from CUDA-graph replay."""
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1000 / COPIES


def main():
    for name, (r, k, norm) in SHAPES.items():
        copies = 2 if r > 100_000 else COPIES
        ws = [torch.randn(r, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        b = torch.randn(r, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        scale = torch.rand(k, device="cuda") + 0.5 if norm else None
        gb = r * k * 2 / 1e9
        scale_factor = COPIES / copies

        def report(label, fn):
            us = timed(fn) * scale_factor
            print(f"{name:14s} {label:34s} {us:8.2f} us  {gb / us * 1e6 / 1e3:6.2f} TB/s", flush=True)

        report("cuBLAS F.linear", lambda: [F.linear(x, w, b) for w in ws])
        report("triton autotuned", lambda: [gemv(x, w, b, norm_scale=scale, eps=1e-5) for w in ws])
        report("triton autotuned, one copy (L2)", lambda: [gemv(x, ws[0], b, norm_scale=scale, eps=1e-5) for _ in ws])
        for c in _configs():
            cfg = dict(c.kwargs, num_warps=c.num_warps)
            report(f"triton {cfg}", lambda: [gemv(x, w, b, norm_scale=scale, eps=1e-5, config=cfg) for w in ws])
        del ws


if __name__ == "__main__":
    main()
