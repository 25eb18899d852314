"""Where a batch-1 decode step's time goes on the GPU: graph replay time, and per-kernel CUDA time of one eager
step against the bytes it must read; then the per-kernel CUDA time of one prefill of the context.
Usage: python scripts/profile_decode.py [--preset gpt-oss-20b] [--context 1024]"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss.bench import random_model
from gptoss.generate import TokenGenerator


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    model = random_model(args.preset, "cuda")
    config = model.config
    generator = TokenGenerator(None, "cuda", context_length=args.context + 200, model=model)
    prompt = torch.randint(0, 199998, (args.context,)).tolist()
    with torch.inference_mode():
        list(generator.generate(prompt, (), temperature=0.0, max_tokens=4))  # captures the graph
        step = generator.graphed_decode
        token = torch.tensor([5], device="cuda")
        position = generator.cache.length - 1  # re-running the last step: same inputs, same cache slots
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(10):
            step(token, position)
        start.record()
        for _ in range(100):
            step(token, position)
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / 100
        attn = config.hidden_size * (config.q_dim + 2 * config.kv_dim + config.q_dim) * 2
        experts = config.experts_per_token * (3 * config.intermediate_size * config.hidden_size) * 17 / 32
        vocab = 2 * config.vocab_size * config.hidden_size
        total = config.num_hidden_layers * (attn + experts) + vocab
        print(f"graph replay: {replay_ms:.3f} ms/token ({1000 / replay_ms:.0f} tokens/s); weights read "
              f"{total / 1e9:.2f} GB -> {total / replay_ms / 1e6:.0f} GB/s")
        positions = torch.tensor([position], device="cuda")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(token, positions, generator.cache)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))

    with torch.inference_mode():  # prefill of the whole prompt, as TokenGenerator runs it
        tokens = torch.tensor(prompt, device="cuda")
        last = torch.tensor([len(prompt) - 1], device="cuda")
        for _ in range(2):
            generator.cache.reset()
            model(tokens, generator.cache.reserve(len(prompt)), generator.cache, logits_rows=last)
        torch.cuda.synchronize()
        generator.cache.reset()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(tokens, generator.cache.reserve(len(prompt)), generator.cache, logits_rows=last)
            torch.cuda.synchronize()
    print(f"prefill of {len(prompt)} tokens:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
