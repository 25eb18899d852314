"""LoRA fine-tuning speed and memory on random weights of a preset's real shapes (no checkpoint needed): a few
optimizer steps of gptoss.finetune.train on chats of about --tokens tokens, then tokens/s and peak GPU memory.
Usage: python scripts/finetune_speed.py [--preset gpt-oss-20b] [--device cuda] [--tokens 2048] [--steps 4]"""

import argparse
import time

import torch

from gptoss.bench import random_model
from gptoss.finetune import example_from_chat, train
from gptoss.lora import add_lora


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=2048, help="about this many tokens an example")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    model = random_model(args.preset, args.device)
    params = add_lora(model, rank=args.rank)
    words = " ".join(f"w{i}" for i in range(args.tokens // 3))  # ~3 tokens a word
    chat = {"messages": [{"role": "user", "content": words[: len(words) // 2]},
                         {"role": "assistant", "content": words[len(words) // 2:]}]}
    example = example_from_chat(chat, "synthetic", max_length=4 * args.tokens)
    train(model, params, [example], epochs=1, progress=False)  # warm-up step
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = train(model, params, [example], epochs=args.steps, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    print(f"{args.preset} LoRA rank {args.rank}: {args.steps} steps of {len(example.tokens)} tokens "
          f"({len(example.tokens) - example.first_target} trained) in {seconds:.1f} s: "
          f"{args.steps * len(example.tokens) / seconds:,.0f} tokens/s, peak GPU memory {peak:.1f} GiB, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
