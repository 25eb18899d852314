"""`gptoss finetune CHECKPOINT --data chats.jsonl --out ADAPTER`: LoRA fine-tuning on harmony chats.

Data: JSON Lines, one example a line: {"messages": [...OpenAI-style chat messages...], "tools": [...],
"reasoning_effort": "low" | "medium" | "high"} (tools and effort optional). The trailing assistant messages of an
example are what it trains: their analysis (`reasoning_content`), answer and tool calls, rendered by harmony as
for training (the last message ends in `<|return|>` or `<|call|>`); the loss is the cross-entropy of predicting
those tokens from everything before them. A line that is not such an example stops the run with one line naming
the file, the line and the field, before any training.

Training: adapters on the attention projections and every expert (gptoss.lora), AdamW on the factors, one
sequence a forward (the model's flat-token forward), gradients summed over --batch-size examples and divided by
their target tokens, gradient norm clipped; examples shuffled each epoch by --seed; each block recomputed in the
backward pass (gradient checkpointing), so memory holds one block's activations at a time. The pure PyTorch path runs
(autograd differentiates it: sink attention, sliding windows, the MoE over packed experts). A progress bar shows
the loss; the adapter is written at the end (gptoss.lora.save_adapter). --eval-data: held-out examples whose mean
token loss is reported before and after training. Under torchrun a tensor/expert-parallel model trains (see
gptoss.parallel and gptoss.lora.add_lora): each rank its slices of the adapter, on every example.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptoss.errors import GptOssError


@dataclass
class Example:
    tokens: list[int]
    first_target: int  # tokens[first_target:] are trained (predicted from what precedes them)


def example_from_chat(record, where: str, max_length: int) -> Example:
    """One JSONL record -> an Example; GptOssError naming `where` (file:line) and the field otherwise."""
    from gptoss.harmony_history import build_conversation, render_for_training, render_prompt

    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise GptOssError(f"{where}: expected an object with a \"messages\" list")
    messages, tools = record["messages"], record.get("tools")
    effort = record.get("reasoning_effort", "medium")
    first = len(messages)
    while first > 0 and isinstance(messages[first - 1], dict) and messages[first - 1].get("role") == "assistant":
        first -= 1
    if first == len(messages):
        raise GptOssError(f"{where}: messages: the example must end with the assistant's turn to train")
    try:
        tokens = render_for_training(build_conversation(messages, tools=tools, reasoning_effort=effort,
                                                        keep_last_turn_analysis=True))
        prompt = render_prompt(build_conversation(messages[:first], tools=tools, reasoning_effort=effort))
    except GptOssError as e:
        raise GptOssError(f"{where}: {e}") from None
    if tokens[:len(prompt)] != prompt:  # harmony renders the history alike in both; anything else is a bug
        raise GptOssError(f"{where}: the rendered example does not start with its prompt")
    if len(tokens) > max_length:
        raise GptOssError(f"{where}: the example has {len(tokens)} tokens, more than --max-length {max_length}")
    return Example(tokens, len(prompt))


def load_examples(path: str, max_length: int) -> list[Example]:
    examples = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise GptOssError(f"{path}: cannot read ({e.strerror or e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise GptOssError(f"{where}: not JSON ({e})") from None
        examples.append(example_from_chat(record, where, max_length))
    if not examples:
        raise GptOssError(f"{path}: no examples")
    return examples


def example_loss(model, example: Example) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the example's target tokens, their count); logits only for the rows that
    predict a target."""
    device = model.device
    tokens = torch.tensor(example.tokens, device=device)
    rows = torch.arange(example.first_target - 1, len(example.tokens) - 1, device=device)
    logits = model(tokens, logits_rows=rows)  # (T, V)
    return F.cross_entropy(logits.float(), tokens[rows + 1], reduction="sum"), len(rows)


@torch.no_grad()
def evaluate(model, examples: list[Example]) -> float:
    """Mean cross-entropy per target token over the examples."""
    total, count = 0.0, 0
    for ex in examples:
        loss, n = example_loss(model, ex)
        total, count = total + loss.item(), count + n
    return total / count


def train(model, params: list[torch.nn.Parameter], examples: list[Example], *, epochs: int = 1, lr: float = 2e-4,
          batch_size: int = 1, max_grad_norm: float = 1.0, seed: int = 0, progress: bool | None = None,
          gradient_checkpointing: bool = True) -> list[float]:
    """Fine-tunes params (the adapter's factors) on the examples; returns each optimizer step's mean token loss.
    gradient_checkpointing: recompute each block in the backward pass (the same gradients, one block's
    activations in memory at a time)."""
    from gptoss.lora import clip_grad_norm

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    steps = epochs * math.ceil(len(examples) / batch_size)
    bar = tqdm(total=steps, desc="fine-tuning", unit="step", disable=not (sys.stderr.isatty() if progress is None
                                                                         else progress))
    losses = []
    model.train()
    model.gradient_checkpointing = gradient_checkpointing
    try:
        for _ in range(epochs):
            shuffled = examples[:]
            order.shuffle(shuffled)
            for start in range(0, len(shuffled), batch_size):
                batch = shuffled[start:start + batch_size]
                targets = sum(len(ex.tokens) - ex.first_target for ex in batch)
                total = 0.0
                for ex in batch:  # one sequence a forward; gradients add up
                    loss, _ = example_loss(model, ex)
                    (loss / targets).backward()
                    total += loss.item()
                clip_grad_norm(model, params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total / targets)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        model.eval()
        model.gradient_checkpointing = False
    return losses


def cmd_finetune(args) -> int:
    """Under torchrun every rank trains its slices of the model and adapter on every example; rank 0 reports and
    writes the whole adapter."""
    from gptoss.cli import _default_device
    from gptoss.parallel import joined, local_device

    examples = load_examples(args.data, args.max_length)  # bad data stops the run before the model loads
    held_out = load_examples(args.eval_data, args.max_length) if args.eval_data else []
    with joined(local_device(args.device or _default_device())) as shard:
        return _finetune(args, shard, examples, held_out)


def _finetune(args, shard, examples: list[Example], held_out: list[Example]) -> int:
    from gptoss.cli import load_model_from_args
    from gptoss.lora import add_lora, save_adapter

    torch.manual_seed(args.seed)  # every rank alike: each draws the whole adapter and keeps its slices
    model, _ = load_model_from_args(args, shard=shard)
    params = add_lora(model, rank=args.rank, alpha=args.alpha, targets=args.targets)
    eval_before = evaluate(model, held_out) if held_out else None
    started = time.perf_counter()
    losses = train(model, params, examples, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   seed=args.seed, progress=None if shard.rank == 0 else False)
    seconds = time.perf_counter() - started
    folder = save_adapter(model, args.out)
    eval_after = evaluate(model, held_out) if held_out else None
    replicated = sum(p.numel() for p in model.lora_replicated)  # held by every rank: counted once
    sliced = torch.tensor([sum(p.numel() for p in params) - replicated], device=model.device)
    count = int(shard.sum(sliced)) + replicated
    if shard.rank == 0:
        held = (f"; held-out loss {eval_before:.4f} -> {eval_after:.4f} over {len(held_out)} examples"
                if held_out else "")
        print(f"gptoss: {len(losses)} steps over {len(examples)} examples in {seconds:.1f} s, "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}{held}; adapter ({count:,} parameters) written to {folder}",
              file=sys.stderr)
    return 0
