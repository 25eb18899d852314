"""`gptoss chat [CHECKPOINT]`: a terminal chat loop in the harmony format.

Reads one user message per line from stdin (a terminal or a pipe) until EOF or `/exit`; `/reset` clears the
history. Each turn renders the whole conversation (gptoss.harmony_history: the reasoning effort in the system
message, --system / --developer text as developer instructions, earlier turns' analysis dropped once answered),
generates with gptoss.generate.TokenGenerator until `<|return|>` / `<|call|>` and streams the answer through the
tolerant HarmonyStreamParser. The analysis channel is hidden unless --show-reasoning (then dimmed on a terminal).
Under torchrun every rank holds its shard of the model (gptoss.parallel): rank 0 reads each line and passes it on,
all ranks generate alike, rank 0 prints.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable

from gptoss.errors import GptOssError

DIM, RESET = "\033[2m", "\033[0m"


class _Writer:
    """Streams reasoning (optionally, dimmed on a tty) and content to stdout."""

    def __init__(self, out, show_reasoning: bool, color: bool):
        self.out, self.show_reasoning, self.color = out, show_reasoning, color
        self.mode = None  # "reasoning" | "content"

    def write(self, mode: str, text: str) -> None:
        if not text or (mode == "reasoning" and not self.show_reasoning):
            return
        if mode != self.mode:
            if self.mode == "reasoning":
                self.out.write((RESET if self.color else "") + "\n")
            if mode == "reasoning":
                self.out.write(DIM if self.color else "[reasoning] ")
            self.mode = mode
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.mode == "reasoning" and self.color:
            self.out.write(RESET)
        self.out.write("\n")
        self.out.flush()
        self.mode = None


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def run_chat(generator, *, reasoning: str = "medium", system: str | None = None, developer: str | None = None,
             show_reasoning: bool = False, max_tokens: int = 0, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, out=None, err=None, interactive: bool | None = None,
             read_line: Callable[[], str | None] | None = None) -> int:
    """The chat loop over an already built TokenGenerator; returns the exit status. read_line: the next user line
    or None at the end (default: stdin's)."""
    from gptoss.harmony_history import build_conversation, render_prompt
    from gptoss.harmony_parser import ContentDelta, Done, HarmonyStreamParser, ReasoningDelta, ToolCallStart
    from gptoss.tokenizer import STOP_TOKENS

    out = out or sys.stdout
    err = err or sys.stderr
    interactive = sys.stdin.isatty() if interactive is None else interactive
    read_line = read_line or (lambda: _read_line(interactive))
    color = bool(getattr(out, "isatty", lambda: False)())
    head = ([{"role": "system", "content": system}] if system else []) + (
        [{"role": "developer", "content": developer}] if developer else [])
    history: list[dict] = []
    turn = 0
    if interactive:
        print("gptoss chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=err)
    while True:
        line = read_line()
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("gptoss: history cleared", file=err)
            continue
        messages = head + history + [{"role": "user", "content": line}]
        try:
            prompt = render_prompt(build_conversation(messages, reasoning_effort=reasoning))
            budget = generator.context_length - len(prompt)
            if budget < 1:
                raise GptOssError(f"the conversation ({len(prompt)} tokens) fills the context length of "
                                  f"{generator.context_length}; /reset to start over")
            n = min(max_tokens, budget) if max_tokens > 0 else budget
            parser = HarmonyStreamParser()
            writer = _Writer(out, show_reasoning, color)
            turn += 1
            out.write("assistant> ")
            out.flush()
            started = time.perf_counter()
            generated = 0
            for token in generator.generate(prompt, STOP_TOKENS, temperature, n, top_p=top_p, top_k=top_k,
                                            seed=seed):
                generated += 1
                for ev in parser.feed(token):
                    if isinstance(ev, ReasoningDelta):
                        writer.write("reasoning", ev.text)
                    elif isinstance(ev, ContentDelta):
                        writer.write("content", ev.text)
                    elif isinstance(ev, ToolCallStart):
                        writer.write("content", f"[tool call {ev.name} (no tools are available in chat)]")
            for ev in parser.finish("length"):
                if isinstance(ev, ContentDelta):
                    writer.write("content", ev.text)
                elif isinstance(ev, ReasoningDelta):
                    writer.write("reasoning", ev.text)
                elif isinstance(ev, Done):
                    pass
            writer.end()
            elapsed = time.perf_counter() - started
            result = parser.result
            rate = f", {generated / elapsed:.1f} tokens/s" if elapsed > 0 else ""
            print(f"[turn {turn}: prompt {len(prompt)} tokens, {generated} generated{rate}, "
                  f"finish {result.finish_reason}]", file=err)
        except GptOssError as e:
            print(f"gptoss: error: {e}", file=err)
            continue
        history.append({"role": "user", "content": line})
        # Tool calls are not kept (no tools are offered); the answer and its reasoning follow the history rules.
        entry = {"role": "assistant", "content": result.content}
        if result.reasoning:
            entry["reasoning_content"] = result.reasoning
        history.append(entry)
    return 0


def cmd_chat(args) -> int:
    from gptoss.cli import _default_device, load_model_from_args
    from gptoss.generate import TokenGenerator
    from gptoss.parallel import joined, local_device

    with joined(local_device(args.device or _default_device())) as shard:  # under torchrun: this rank's part
        model, device = load_model_from_args(args, shard=shard)
        generator = TokenGenerator(None, device, context_length=args.context, model=model)
        speaks = shard.rank == 0
        interactive = speaks and sys.stdin.isatty()
        return run_chat(generator, reasoning=args.reasoning, system=args.system, developer=args.developer,
                        show_reasoning=args.show_reasoning, max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        out=None if speaks else io.StringIO(), err=None if speaks else io.StringIO(),
                        interactive=interactive,
                        read_line=lambda: shard.object_from_first(_read_line(interactive) if speaks else None))
