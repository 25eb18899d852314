"""The `gptoss` command."""

import argparse
import codecs
import io
import logging
import sys
import time

from gptoss.errors import GptOssError


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _checkpoint_or_demo(checkpoint: str | None, announce: bool = True) -> str:
    if checkpoint:
        return checkpoint
    from gptoss.demo import ensure_demo_checkpoint

    folder = ensure_demo_checkpoint()
    if announce:
        print(f"gptoss: no checkpoint given, using the built-in demo checkpoint ({folder}): a tiny model with "
              "random weights, so its output is noise. Pass a gpt-oss folder for real text.", file=sys.stderr)
    return str(folder)


def load_model_from_args(args, folder: str | None = None, shard=None):
    """Loads args.checkpoint (or `folder`, or the demo) as the model commands' shared options say, whole or as
    `shard` (a gptoss.parallel.Shard) says. Returns (model, device); prints the load time on stderr."""
    import torch

    from gptoss.checkpoint import load_model
    from gptoss.parallel import SINGLE, local_device

    shard = shard or SINGLE
    device = str(local_device(args.device or _default_device()))
    if args.dtype != "bfloat16" and device != "cpu":
        raise GptOssError(f"--dtype {args.dtype} runs on the CPU only: the GPU kernels compute in bfloat16")
    started = time.perf_counter()
    folder = folder or _checkpoint_or_demo(args.checkpoint, announce=shard.rank == 0)
    model = load_model(folder, device=device, dtype=getattr(torch, args.dtype), dequantize=args.dequantize,
                       progress=None if shard.rank == 0 else False, shard=shard)
    if args.adapter:
        from gptoss.lora import load_adapter

        load_adapter(model, args.adapter)
    if shard.rank == 0:
        parts = f" (rank 0 of {shard.world_size})" if shard.parallel else ""
        print(f"gptoss: loaded in {time.perf_counter() - started:.1f} s on {device}{parts}", file=sys.stderr)
    return model, device


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder (HF repo root or its original/); "
                        "default: the built-in demo checkpoint")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--context", type=int, default=None, help="KV cache context length (default 8192)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="parameters' and activations' dtype; float32 (CPU only) for checks against the reference")
    parser.add_argument("--dequantize", action="store_true",
                        help="store MXFP4 experts as dense --dtype weights at load")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (gptoss finetune) merged at load")


def _add_sampling_options(parser) -> None:
    parser.add_argument("-t", "--temperature", type=float, default=1.0, help="0 for greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(sampling=True)  # main() checks the settings before anything is loaded


def cmd_generate(args) -> int:
    from gptoss.parallel import joined, local_device

    with joined(local_device(args.device or _default_device())) as shard:  # under torchrun: this rank's part
        return _generate(args, shard)


def _generate(args, shard) -> int:
    import torch

    from gptoss.generate import TokenGenerator
    from gptoss.tokenizer import ENDOFTEXT, STOP_TOKENS, get_tokenizer

    model, device = load_model_from_args(args, shard=shard)
    generator = TokenGenerator(None, device, context_length=args.context, model=model)
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(args.prompt, allowed_special="all")
    generator.check_request(prompt, args.max_tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout if shard.rank == 0 else io.StringIO()  # every rank computes; rank 0 speaks
    out.write(args.prompt)
    out.flush()
    started = time.perf_counter()
    first_token_at = None
    generated = 0
    for token in generator.generate(prompt, (*STOP_TOKENS, ENDOFTEXT), temperature=args.temperature,
                                    max_tokens=args.max_tokens, top_p=args.top_p, top_k=args.top_k, seed=args.seed):
        if first_token_at is None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            first_token_at = time.perf_counter()
        generated += 1
        out.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
        out.flush()
    finished = time.perf_counter()
    out.write(decoder.decode(b"", final=True) + "\n")
    prefill_s = first_token_at - started
    decode_s = finished - first_token_at
    decode_rate = f"{(generated - 1) / decode_s:.1f} tokens/s" if generated > 1 and decode_s > 0 else "n/a"
    if shard.rank == 0:
        print(f"gptoss: prompt {len(prompt)} tokens at {len(prompt) / prefill_s:.1f} tokens/s; "
              f"decode {generated} tokens at {decode_rate}", file=sys.stderr)
    return 0


def cmd_init_checkpoint(args) -> int:
    from gptoss.checkpoint_writer import write_checkpoint
    from gptoss.config import preset

    started = time.perf_counter()
    out = write_checkpoint(args.out, preset(args.preset), layout=args.layout, experts=args.experts, seed=args.seed,
                           device=args.device, num_shards=args.shards, progress=sys.stderr.isatty())
    print(f"gptoss: wrote {args.preset} ({args.layout} layout, {args.experts} experts, random weights) to {out} "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from gptoss.bench import run

    run(args)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _targets(text: str) -> tuple[str, ...]:
    from gptoss.lora import TARGETS

    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets or not set(targets) <= set(TARGETS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(TARGETS)}, got {text!r}")
    return targets


def _int_in(text: str, low: int, high: float, expected: str) -> int:
    """text as an int in low..high, else the argparse error "expected <expected>, got <text>"."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_in(text, 1, float("inf"), "a positive integer")


def _port(text: str) -> int:
    return _int_in(text, 0, 65535, "a port number 0-65535")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss",
        description="Run OpenAI's gpt-oss models (gpt-oss-20b, gpt-oss-120b) from their released checkpoints.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (default: quiet)")
    parser.add_argument("--version", action="version", version=f"gptoss {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="complete a raw text prompt, streaming the text",
                              description="Complete a raw text prompt (no chat template), streaming the output; "
                              "ends with prompt and decode tokens per second.")
    _add_model_options(gen)
    gen.add_argument("-p", "--prompt", required=True, help="the text to complete")
    gen.add_argument("-n", "--max-tokens", type=int, default=100, help="tokens to generate (default 100)")
    _add_sampling_options(gen)
    gen.set_defaults(func=cmd_generate)

    init = commands.add_parser("init-checkpoint", help="write random weights in a released layout",
                               description="Write a checkpoint with random weights and the exact names, shapes "
                               "and dtypes of the release (for tests, benchmarks and demos).")
    init.add_argument("out", help="folder to create")
    init.add_argument("--preset", default="tiny", help="tiny, gpt-oss-20b or gpt-oss-120b (default tiny)")
    init.add_argument("--layout", default="original", choices=("original", "hf"))
    init.add_argument("--experts", default="mxfp4", choices=("mxfp4", "dense"),
                      help="hf layout only: MXFP4 blocks/scales or dequantized bf16 (default mxfp4)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is much faster)")
    init.add_argument("--shards", type=int, default=None, help="number of safetensors files")
    init.set_defaults(func=cmd_init_checkpoint)

    bench = commands.add_parser("bench", help="measure load, prefill and decode speed on the GPU",
                                description="Benchmark on a CUDA GPU: load time, prefill tokens/s, batch-1 decode "
                                "tokens/s at given contexts, and peak GPU memory. Without CHECKPOINT, random weights "
                                "of the preset's real shapes are created in GPU memory.")
    bench.add_argument("checkpoint", nargs="?", help="checkpoint folder (default: random weights of --preset)")
    bench.add_argument("--preset", default="gpt-oss-20b", help="gpt-oss-20b or gpt-oss-120b (default 20b)")
    bench.add_argument("--prompt-lengths", type=_int_list, default=[1024, 8192], help="default 1024,8192")
    bench.add_argument("--decode-contexts", type=_int_list, default=[1024, 32768], help="default 1024,32768")
    bench.add_argument("--decode-tokens", type=int, default=128, help="tokens timed per decode run (default 128)")
    bench.add_argument("--compare", choices=("hf",), help="also run Hugging Face transformers on the same weights")
    bench.add_argument("--json", help="write the results to this file")
    bench.add_argument("--serve", type=_positive_int, metavar="N", help="instead: output tokens/s of the batching "
                       "engine with N concurrent requests (1024-token prompts, 256 output tokens each)")
    bench.add_argument("--max-prefill-tokens", type=_positive_int, default=8192,
                       help="with --serve: tokens one prefill step packs at most (default 8192)")
    bench.set_defaults(func=cmd_bench)

    chat = commands.add_parser("chat", help="chat in the terminal (harmony format, multi-turn)",
                               description="Chat with the model: one message per line on stdin, until EOF or "
                               "/exit; /reset clears the history. Works with piped stdin.")
    _add_model_options(chat)
    chat.add_argument("--reasoning", default="medium", choices=("low", "medium", "high"),
                      help="reasoning effort (default medium)")
    chat.add_argument("--system", default=None, help="system instructions")
    chat.add_argument("--developer", default=None, help="developer instructions")
    chat.add_argument("--show-reasoning", action="store_true", help="show the analysis channel (dimmed on a tty)")
    chat.add_argument("-n", "--max-tokens", type=int, default=0,
                      help="tokens to generate per turn at most (default 0: up to the context length)")
    _add_sampling_options(chat)
    chat.set_defaults(func=_lazy("gptoss.chat", "cmd_chat"))

    serve = commands.add_parser("serve", help="serve an OpenAI-compatible API (chat completions, responses)",
                                description="Serve /v1/chat/completions, /v1/responses, /v1/models and /health "
                                "with continuous batching.")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: $GPTOSS_API_KEY, else no key)")
    serve.add_argument("--max-batch-size", type=_positive_int, default=64,
                       help="requests decoded together (default 64)")
    serve.add_argument("--max-prefill-tokens", type=_positive_int, default=8192,
                       help="tokens one prefill step packs at most (default 8192; longer prompts are prefilled in "
                       "chunks): larger steps keep the GPU busier, at the cost of more memory a step and a later "
                       "first token for a burst's first requests")
    serve.add_argument("--model-name", default=None, help="model id clients send (default: the checkpoint "
                       "folder's name)")
    serve.set_defaults(func=_lazy("gptoss.server", "cmd_serve"))

    tune = commands.add_parser("finetune", help="fine-tune LoRA adapters on chat examples (JSON Lines)",
                               description="Fine-tune low-rank adapters on the attention projections and every "
                               "expert, on harmony-rendered chats: each JSONL line {\"messages\": [...], "
                               "\"tools\": [...], \"reasoning_effort\": ...} trains its trailing assistant turn. "
                               "Use the adapter with --adapter (expert adapters need --dequantize).")
    tune.add_argument("checkpoint", nargs="?", help="checkpoint folder (default: the built-in demo checkpoint)")
    tune.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tune.add_argument("--data", required=True, help="training examples, JSON Lines")
    tune.add_argument("--eval-data", default=None, help="held-out examples (JSON Lines): loss before and after")
    tune.add_argument("--out", required=True, help="adapter folder to write")
    tune.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    tune.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: updates are scaled by alpha / rank")
    tune.add_argument("--targets", type=_targets, default=("attention", "experts"),
                      help="comma-separated: attention, experts (default both)")
    tune.add_argument("--epochs", type=int, default=1)
    tune.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    tune.add_argument("--batch-size", type=int, default=1, help="examples per optimizer step (default 1)")
    tune.add_argument("--max-length", type=int, default=4096, help="longest example in tokens (default 4096)")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=_lazy("gptoss.finetune", "cmd_finetune"), context=None, dtype="bfloat16",
                      dequantize=False, adapter=None)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptoss")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def _lazy(module: str, name: str):
    """A command function imported on first use (keeps `gptoss --help` fast; fastapi is only needed to serve)."""

    def run(args) -> int:
        import importlib

        try:
            command = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as err:  # an optional dependency (the `serve` extra)
            raise GptOssError(f"`gptoss {args.command}` needs {err.name!r}: pip install 'gptoss[serve]'") from None
        return command(args)

    return run


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if getattr(args, "sampling", False):
            from gptoss.sampling import check_settings

            check_settings(args.temperature, args.top_k, args.top_p)
        return args.func(args)
    except GptOssError as err:
        print(f"gptoss: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
