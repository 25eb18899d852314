"""The expert GEMMs of gptoss.kernels.moe_dense in other forms, at gpt-oss-20b shapes (E=32, H=I=2880, K=4, the
augmented matrices' 2,896 inputs), random routing: torch's grouped GEMM as moe_dense runs it, the same with the
weights stored input-major, one cuBLAS `mm` an expert (segment ends known on the host, or read from the device first),
and a `bmm` over every expert padded to the busiest one's rows; then the dequantizing pass alone. Eager, CUDA events,
median of 10 calls; TFLOP/s count the pairs' rows only.

  python scripts/dense_gemm_forms.py [N ...]        (tokens; default 1024 4096 8192 16384)
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_moe import bench  # noqa: E402

from gptoss.kernels.moe_dense import dequantize_augmented, padded_columns  # noqa: E402

E, H, I, K = 32, 2880, 2880, 4
HP, IP = padded_columns(H), padded_columns(I)


def median_us(fn) -> float:
    return bench(fn, iters=10, warmup=1) * 1000


def per_expert_mm(a, w, ends, out):
    start = 0
    for e, end in enumerate(ends):
        torch.mm(a[start:end], w[e].t(), out=out[start:end])
        start = end


def main():
    w1 = torch.randn(E, 2 * I, HP, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, H, IP, device="cuda", dtype=torch.bfloat16) * 0.02
    w1_kn, w2_kn = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()  # (E, inputs, outputs)
    for n in [int(a) for a in sys.argv[1:]] or [1024, 4096, 8192, 16384]:
        m = n * K
        ids = torch.rand(n, E, device="cuda").topk(K, dim=1).indices.flatten()
        counts = torch.bincount(ids, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        busiest = int(counts.max())
        x = torch.randn(m, HP, device="cuda", dtype=torch.bfloat16)
        act = torch.randn(m, IP, device="cuda", dtype=torch.bfloat16)
        h = torch.empty(m, 2 * I, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, H, device="cuda", dtype=torch.bfloat16)
        x_pad = torch.randn(E, busiest, HP, device="cuda", dtype=torch.bfloat16)
        act_pad = torch.randn(E, busiest, IP, device="cuda", dtype=torch.bfloat16)
        ends = offs.tolist()
        forms = {
            "grouped_mm": (lambda: F.grouped_mm(x, w1.transpose(1, 2), offs=offs),
                           lambda: F.grouped_mm(act, w2.transpose(1, 2), offs=offs)),
            "grouped_mm, input-major weights": (lambda: F.grouped_mm(x, w1_kn, offs=offs),
                                                lambda: F.grouped_mm(act, w2_kn, offs=offs)),
            "mm an expert": (lambda: per_expert_mm(x, w1, ends, h), lambda: per_expert_mm(act, w2, ends, y)),
            "mm an expert, ends read first": (lambda: per_expert_mm(x, w1, offs.tolist(), h),
                                              lambda: per_expert_mm(act, w2, offs.tolist(), y)),
            "bmm padded to the busiest": (lambda: torch.bmm(x_pad, w1.transpose(1, 2)),
                                          lambda: torch.bmm(act_pad, w2.transpose(1, 2))),
        }
        flops1, flops2 = 2 * m * HP * 2 * I, 2 * m * IP * H
        print(f"{n} tokens ({m // E} rows an expert, the busiest {busiest}), us for mlp1 + mlp2:", flush=True)
        for name, (mlp1, mlp2) in forms.items():
            t1, t2 = median_us(mlp1), median_us(mlp2)
            print(f"  {name:32s} {t1:8.1f} ({flops1 / t1 / 1e6:4.0f} TFLOP/s) + {t2:8.1f} "
                  f"({flops2 / t2 / 1e6:4.0f})", flush=True)

    for rows, inputs in ((2 * I, H), (H, I)):
        blocks = torch.randint(0, 256, (E, rows, inputs // 32, 16), device="cuda", dtype=torch.uint8)
        scales = torch.randint(118, 130, (E, rows, inputs // 32), device="cuda", dtype=torch.uint8)
        bias = torch.randn(E, rows, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(E, rows, padded_columns(inputs), device="cuda", dtype=torch.bfloat16)
        t = median_us(lambda: dequantize_augmented(blocks, scales, bias, out))
        gb = (blocks.numel() + scales.numel() + out.numel() * 2) / 1e9
        print(f"dequantizing pass, {rows} x {inputs}: {t:.1f} us ({gb / t * 1e3:.2f} TB/s)", flush=True)


if __name__ == "__main__":
    main()
