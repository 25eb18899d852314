"""Where a batched decode step of the engine goes on the GPU: graph replay time of one step for B sequences at a
given context, then the per-kernel CUDA time of that step (profiled through the graph replay), then what sampling
B rows costs (greedy; temperature 1 with each row's own seed, as the engine samples).
Usage: python scripts/profile_engine_step.py [--preset gpt-oss-20b] [--batch 64] [--context 1024]"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss.bench import random_model
from gptoss.engine import Engine
from gptoss.sampling import sample


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    model = random_model(args.preset, "cuda")
    per_sequence = -(-(args.context + 1) // 16)
    engine = Engine(model, max_batch_size=args.batch, context_length=args.context + 16, block_size=16,
                    num_blocks=args.batch * per_sequence)
    vocab = model.config.vocab_size
    tables = [[engine.blocks.allocate() for _ in range(engine.blocks.blocks_for(args.context + 1))]
              for _ in range(args.batch)]
    with torch.inference_mode():
        for table in tables:  # real prefills: the cache holds what a served request's would
            engine._forward(torch.randint(vocab, (args.context,), device="cuda"), [(table, 0, args.context)])
        entries = [(table, args.context, args.context + 1) for table in tables]
        tokens = torch.randint(vocab, (args.batch,), device="cuda")
        for _ in range(3):
            engine._forward(tokens, entries)  # captures the bucket's graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            engine._forward(tokens, entries)
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / 20
        print(f"batch {args.batch} at context {args.context}: {step_ms:.2f} ms a step "
              f"({args.batch * 1000 / step_ms:,.0f} tokens/s, host metadata included)")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._forward(tokens, entries)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    profile_sampling(args.batch, vocab)


def profile_sampling(batch: int, vocab: int) -> None:
    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16)
    seeds = torch.arange(batch, device="cuda")
    mixed = [0.0, 0.7, 1.0, 1.3] * (batch // 4) + [1.0] * (batch % 4)
    cases = {"greedy": lambda: logits.argmax(-1),
             "temperature 1, a seed per row": lambda: sample(logits, 1.0, seeds=seeds, draws=seeds),
             "temperatures 0 / 0.7 / 1 / 1.3 by row, a seed per row": lambda: sample(logits, mixed, seeds=seeds,
                                                                                    draws=seeds),
             "temperature 1, top_p 0.9, a seed per row": lambda: sample(logits, 1.0, top_p=0.9, seeds=seeds,
                                                                        draws=seeds)}
    for name, run in cases.items():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        for _ in range(20):
            run()
        end.record()
        host = (time.perf_counter() - host) / 20
        torch.cuda.synchronize()
        print(f"sampling {batch} rows, {name}: {start.elapsed_time(end) / 20:.3f} ms on the GPU, "
              f"{host * 1000:.3f} ms to enqueue")


if __name__ == "__main__":
    main()
