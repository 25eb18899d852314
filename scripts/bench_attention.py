"""Micro-benchmark of the Triton attention kernels (gptoss.kernels.attention_triton) on a CUDA GPU.

    python scripts/bench_attention.py [--sweep] [--decode-only] [--json out.json]

Prefill: one sequence of N tokens, Hq=64, Hkv=8, D=64, full causal and sliding window 128; TFLOP/s counts the
visible (query, key) pairs only (4*D flops per pair per head). Decode: one query per sequence; GB/s counts the K
and V bytes read. Baselines: the pure reference (sink_attention) where it fits, and torch SDPA (flash, causal,
no sink/window) as a stock-kernel yardstick for full-causal prefill.
"""

import argparse
import itertools
import json
import math
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from gptoss.kernels.attention import attention_mask, sink_attention
from gptoss.kernels.attention_triton import decode_attention, prefill_attention
from gptoss.kernels.norm_triton import rms_norm

HQ, HKV, D = 64, 8, 64
SCALE = 1 / math.sqrt(D)
DT = torch.bfloat16
RESULTS = []


def report(name, ms, flops=None, nbytes=None, **extra):
    row = dict(name=name, ms=round(ms, 4), **extra)
    msg = f"{name:58s} {ms * 1e3:10.1f} us"
    if flops:
        row["tflops"] = round(flops / ms / 1e9, 1)
        msg += f"  {row['tflops']:7.1f} TFLOP/s"
    if nbytes:
        row["gbps"] = round(nbytes / ms / 1e6, 1)
        msg += f"  {row['gbps']:7.1f} GB/s"
    for k, v in extra.items():
        msg += f"  {k}={v}"
    print(msg, flush=True)
    RESULTS.append(row)


def visible_pairs(n, window):
    pos = torch.arange(n, dtype=torch.float64)
    return float((pos + 1).clamp(max=window or n).sum())


def bench_prefill(sweep):
    for n in (1024, 8192):
        q = torch.randn(n, HQ, D, device="cuda", dtype=DT)
        k = torch.randn(n, HKV, D, device="cuda", dtype=DT)
        v = torch.randn(n, HKV, D, device="cuda", dtype=DT)
        sinks = torch.randn(HQ, device="cuda", dtype=DT)
        for window in (128, None):
            flops = 4 * D * HQ * visible_pairs(n, window)
            tag = f"prefill N={n} window={window}"
            ms = do_bench(lambda: prefill_attention(q, k, v, sinks, 0, window, SCALE))
            report(f"{tag} triton(default)", ms, flops)
            if sweep and n == 8192:
                best = None
                tiles = [(32, 32), (64, 32), (64, 64), (128, 32)] if window else [(128, 64), (128, 128), (256, 64)]
                for bm, bn in tiles:
                    for nw in (4, 8):
                        for ns in (1, 2, 3, 4):
                            kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
                            try:
                                ms = do_bench(lambda: prefill_attention(q, k, v, sinks, 0, window, SCALE, **kw))
                            except Exception as e:  # out of shared memory etc.
                                print(f"  {kw} failed: {type(e).__name__}", flush=True)
                                continue
                            if best is None or ms < best[0]:
                                best = (ms, kw)
                report(f"{tag} triton(best sweep)", best[0], flops, cfg=best[1])
            pos = torch.arange(n, device="cuda")
            if n <= 1024:
                mask = attention_mask(pos, pos, window)
                ms = do_bench(lambda: sink_attention(q, k, v, sinks, mask, SCALE))
                report(f"{tag} torch reference (sink_attention)", ms, flops)
            if window is None:
                g = HQ // HKV
                qt = q.transpose(0, 1)[None].contiguous()
                kt = k.repeat_interleave(g, dim=1).transpose(0, 1)[None].contiguous()
                vt = v.repeat_interleave(g, dim=1).transpose(0, 1)[None].contiguous()

                def sdpa():
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=SCALE)

                try:
                    ms = do_bench(sdpa)
                    report(f"{tag} torch SDPA causal (no sink, yardstick)", ms, flops)
                except Exception as e:
                    print(f"  SDPA failed: {e}", flush=True)


def bench_decode(sweep):
    cases = [  # (batch, context, layout, window)
        (1, 1024, "contiguous", None),
        (1, 32768, "contiguous", None),
        (1, 32768, "ring", 128),
        (64, 1024, "paged", None),
        (64, 1024, "paged", 128),
        (64, 8192, "paged", None),
    ]
    for batch, ctx, layout, window in cases:
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
        sinks = torch.randn(HQ, device="cuda", dtype=DT)
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        block_table = None
        if layout == "contiguous":
            kc = torch.randn(batch, ctx, HKV, D, device="cuda", dtype=DT)
        elif layout == "ring":
            kc = torch.randn(batch, window, HKV, D, device="cuda", dtype=DT)
        else:
            bs = 16
            nb = batch * ctx // bs
            kc = torch.randn(nb, bs, HKV, D, device="cuda", dtype=DT)
            block_table = torch.randperm(nb, device="cuda").view(batch, ctx // bs).to(torch.int32)
        vc = torch.randn_like(kc)
        keys = min(ctx, window or ctx)
        nbytes = 2 * batch * keys * HKV * D * 2
        tag = f"decode B={batch} ctx={ctx} {layout} window={window}"

        def run(**kw):
            return decode_attention(q, kc, vc, sinks, seq_lens, window, SCALE, block_table=block_table, **kw)

        ms = do_bench(run)
        report(f"{tag} triton", ms, nbytes=nbytes)
        ms = do_bench_cudagraph(run)
        report(f"{tag} triton (cuda graph)", ms, nbytes=nbytes)
        if sweep:
            best = None
            for bn, nw, stages, splits in itertools.product((64, 128), (4, 8), (2, 3), (1, 2, 4, 8, 16, 32, 64, 128)):
                if splits > 1 and batch * HKV * splits > 8192:
                    continue
                kw = dict(block_n=bn, num_warps=nw, num_stages=stages, num_splits=splits)
                try:
                    ms = do_bench_cudagraph(lambda: run(**kw))
                except Exception as e:
                    print(f"  {kw} failed: {type(e).__name__}", flush=True)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, kw)
            report(f"{tag} triton (cuda graph, best sweep)", best[0], nbytes=nbytes, cfg=best[1])
        if batch == 1 and layout != "paged":
            lo = max(0, ctx - window) if window else 0
            pos = torch.arange(lo, ctx, device="cuda")
            slots = pos % kc.shape[1]
            mask = attention_mask(torch.tensor([ctx - 1], device="cuda"), pos, window)

            def ref():
                return sink_attention(q, kc[0, slots], vc[0, slots], sinks, mask, SCALE)

            ms = do_bench(ref)
            report(f"{tag} torch reference (gather + sink_attention)", ms, nbytes=nbytes)


def bench_rms_norm():
    for n in (1, 8192):
        x = torch.randn(n, 2880, device="cuda", dtype=DT)
        w = torch.rand(2880, device="cuda")
        ms = do_bench(lambda: rms_norm(x, w, 1e-5))
        report(f"rms_norm N={n} H=2880 triton", ms, nbytes=2 * x.numel() * 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep tile configs")
    ap.add_argument("--decode-only", action="store_true", help="only the decode cases")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, file=sys.stderr)
    torch.manual_seed(0)
    if not args.decode_only:
        bench_prefill(args.sweep)
    bench_decode(args.sweep)
    if not args.decode_only:
        bench_rms_norm()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), results=RESULTS), f, indent=1)


if __name__ == "__main__":
    main()
