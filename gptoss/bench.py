"""`gptoss bench`: load time, prefill and decode speed, and peak GPU memory, optionally beside transformers.

Random weights of the real shapes are created directly in GPU memory (a 120b checkpoint file would not fit many
disks), or a checkpoint is loaded. Decode runs the product path (TokenGenerator: CUDA-graph step, sampling, one
host sync per token as when streaming).
"""

import contextlib
import dataclasses
import gc
import json
import math
import statistics
import time

import torch

from gptoss.checkpoint import load_model
from gptoss import mxfp4
from gptoss.checkpoint_writer import fill_random, to_hf_tensors
from gptoss.config import preset
from gptoss.generate import TokenGenerator
from gptoss.layouts import DENSE
from gptoss.model import Transformer


@dataclasses.dataclass
class BenchResult:
    engine: str
    model: str
    device: str
    load_s: float
    prefill_tokens_per_s: dict[int, float]
    decode_tokens_per_s: dict[int, float]
    peak_memory_gib: float


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def random_model(name: str, device: str, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    with torch.device("meta"):
        model = Transformer(preset(name), dtype=dtype)
    model.to_empty(device=device)
    fill_random(model, seed=0)
    return model.eval().requires_grad_(False)


def decisive_routers(model):
    """Random routers made decisive, for comparing two paths' numerics. With plain random routers a one-ulp
    difference upstream often swaps a token's 4th and 5th expert, and each swap moves that token by O(1): the
    comparison would measure routing chaos, not the kernels. Here each layer's bias favours 4 experts (a different
    4 per layer) over token-dependent logits 20x smaller."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.block:
            favoured = torch.randperm(model.config.num_experts, generator=gen)[: model.config.experts_per_token]
            bias = torch.zeros(model.config.num_experts)
            bias[favoured] = 2.0
            block.mlp.gate.bias.copy_(bias)
            block.mlp.gate.weight.mul_(0.05)
    return model


def _prompt(length: int, vocab: int) -> list[int]:
    return torch.randint(0, min(vocab, 199998), (length,), generator=torch.Generator().manual_seed(length)).tolist()


@torch.inference_mode()
def bench_gptoss(model: Transformer, name: str, load_s: float, prompt_lengths, decode_contexts, decode_tokens):
    device = str(model.device)
    vocab = model.config.vocab_size
    prefill = {}
    for length in prompt_lengths:
        generator = TokenGenerator(None, device, context_length=length + 1, model=model)
        tokens = torch.tensor(_prompt(length, vocab), device=device)
        last = torch.tensor([length - 1], device=device)  # a prompt's prefill needs only its last row's logits
        times = []
        # the first run compiles and autotunes kernels; then the best of at least 9 runs spanning at least 2 s: for
        # a short prompt the runs right after an autotuning burst were ~13% slower on the H100 (29k against 34k
        # tok/s at 1k tokens, whereas a process with the tuning cached measured 34k at once)
        while len(times) < 10 or sum(times[1:]) < 2.0:
            generator.cache.reset()
            started = _sync_time()
            model(tokens, generator.cache.reserve(length), generator.cache, logits_rows=last)
            times.append(_sync_time() - started)
        prefill[length] = length / min(times[1:])
        del generator
    decode = {}
    for context in decode_contexts:
        generator = TokenGenerator(None, device, context_length=context + decode_tokens + 1, model=model)
        prompt = _prompt(context, vocab)
        for _ in range(2):  # the first run captures the CUDA graph
            stamps = []
            for _token in generator.generate(prompt, (), temperature=0.0, max_tokens=decode_tokens):
                stamps.append(time.perf_counter())
        decode[context] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        del generator
    return BenchResult("gptoss", name, torch.cuda.get_device_name(), load_s, prefill, decode,
                       torch.cuda.max_memory_allocated() / 2**30)


@contextlib.contextmanager
def kernel_builds():
    """Yields the list of Triton kernels built (compiled, or loaded from Triton's disk cache) while the block runs,
    appended as they come; None where this Triton has no compile hook. A timed round should build none: a build
    stalls the host while the GPU waits, inside the GPU time of the step that launches it."""
    try:
        from triton import knobs
    except ImportError:  # no Triton, or one older than its knobs
        knobs = None
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook"):
        yield None
        return
    built: list[str] = []
    previous = runtime.jit_cache_hook

    def hook(*args, **kwargs):
        built.append(kwargs["fn"].name)
        return previous(*args, **kwargs) if previous else False

    runtime.jit_cache_hook = hook
    try:
        yield built
    finally:
        runtime.jit_cache_hook = previous


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of a non-empty list."""
    return sorted(values)[math.ceil(q / 100 * len(values)) - 1]


def bench_engine(model: Transformer, concurrency: int, prompt_length: int, output_tokens: int,
                 max_prefill_tokens: int = 8192) -> dict:
    """Output tokens/s of the continuous-batching engine with `concurrency` requests in flight at once, and the
    latencies a client of each request sees: time to its first token (ttft) and between its tokens (itl), in ms,
    median and 99th percentile."""
    import asyncio

    from gptoss.engine import Engine, SamplingParams

    engine = Engine(model, max_batch_size=concurrency, context_length=prompt_length + output_tokens + 16,
                    num_blocks=concurrency * ((prompt_length + output_tokens) // 16 + 2),
                    max_prefill_tokens=max_prefill_tokens)
    params = SamplingParams(max_tokens=output_tokens, temperature=1.0, seed=0, stop_token_ids=())

    async def one(i: int) -> list[float]:
        """-> the times (s) from the request's submission to each of its tokens' arrival."""
        prompt = _prompt(prompt_length, model.config.vocab_size)
        prompt[0] = i  # distinct first tokens: no prefix shared between requests, nor with the warm-up's
        sent = time.perf_counter()
        return [time.perf_counter() - sent async for _ in engine.generate(prompt, params)]

    async def run_all(first: int) -> list[list[float]]:
        return await asyncio.gather(*(one(first + i) for i in range(concurrency)))

    engine.warm_up()
    engine.start()
    try:
        asyncio.run(run_all(concurrency))  # warm-up with the same shapes (the engine's own warm-up covers the rest)
        before = engine.stats()
        with kernel_builds() as built:
            started = time.perf_counter()
            arrivals = asyncio.run(run_all(0))
            elapsed = time.perf_counter() - started
        after = engine.stats()
    finally:
        engine.stop()
    steps = {key: after[key] - before[key] for key in after
             if key.startswith(("prefill_", "decode_")) or key == "cached_prefix_blocks"}
    generated = sum(len(times) for times in arrivals)
    firsts = [1e3 * times[0] for times in arrivals]
    gaps = [1e3 * (b - a) for times in arrivals for a, b in zip(times, times[1:])] or [0.0]
    latency = {"ttft_ms_median": statistics.median(firsts), "ttft_ms_p99": _percentile(firsts, 99),
               "itl_ms_median": statistics.median(gaps), "itl_ms_p99": _percentile(gaps, 99)}
    return {"concurrency": concurrency, "prompt_tokens": prompt_length, "output_tokens": generated,
            "seconds": elapsed, "output_tokens_per_s": generated / elapsed, **latency, "kernels_built": built,
            **steps}


def hf_state_dict(model: Transformer):
    """Yields (HF name, tensor) for a transformers GptOssForCausalLM with dense bf16 experts."""
    packed_pairs = mxfp4.PairCollector()
    for name, tensor in model.state_dict().items():  # our state keys are the original checkpoint's names
        yield from to_hf_tensors(name, tensor, model.config, DENSE, packed_pairs)


@torch.inference_mode()
def bench_transformers(model: Transformer, name: str, prompt_lengths, decode_contexts, decode_tokens):
    """Hugging Face transformers (bf16, dequantized experts, eager attention) on the same weights."""
    import transformers

    config = transformers.GptOssConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                                          if k != "architectures"})
    device = model.device
    started = _sync_time()
    with torch.device("meta"):
        hf = transformers.GptOssForCausalLM._from_config(config, dtype=torch.bfloat16)
    hf = hf.to_empty(device=device)
    hf_state = hf.state_dict()
    for hf_name, tensor in hf_state_dict(model):
        hf_state[hf_name].copy_(tensor)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(device)  # its float32 tables are not weights
    hf.eval()
    load_s = _sync_time() - started
    vocab = model.config.vocab_size
    prefill = {}
    for length in prompt_lengths:
        tokens = torch.tensor([_prompt(length, vocab)], device=device)
        times = []
        for _ in range(2):
            started = _sync_time()
            hf(tokens, use_cache=False, logits_to_keep=1)
            times.append(_sync_time() - started)
        prefill[length] = length / min(times)
    decode = {}
    for context in decode_contexts:
        tokens = torch.tensor([_prompt(context, vocab)], device=device)
        times = []
        for new in (1, decode_tokens + 1):  # the difference removes the prefill
            started = _sync_time()
            hf.generate(tokens, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            times.append(_sync_time() - started)
        decode[context] = decode_tokens / (times[1] - times[0])
    del hf
    return BenchResult("transformers", name, torch.cuda.get_device_name(), load_s, prefill, decode,
                       torch.cuda.max_memory_allocated() / 2**30)


def format_table(results: list[BenchResult]) -> str:
    lines = []
    for r in results:
        cells = [f"{r.engine} {r.model}", f"load {r.load_s:.1f} s"]
        cells += [f"prefill {n}: {v:,.0f} tok/s" for n, v in r.prefill_tokens_per_s.items()]
        cells += [f"decode @{n}: {v:,.1f} tok/s" for n, v in r.decode_tokens_per_s.items()]
        cells.append(f"peak {r.peak_memory_gib:.1f} GiB")
        lines.append(" | ".join(cells))
    if len(results) == 2:
        ours, theirs = results
        ratios = [f"prefill {n}: {ours.prefill_tokens_per_s[n] / v:.1f}x" for n, v in theirs.prefill_tokens_per_s.items()
                  if n in ours.prefill_tokens_per_s]
        ratios += [f"decode @{n}: {ours.decode_tokens_per_s[n] / v:.1f}x" for n, v in theirs.decode_tokens_per_s.items()
                   if n in ours.decode_tokens_per_s]
        lines.append("gptoss / transformers: " + ", ".join(ratios))
    return "\n".join(lines)


def run(args) -> list[BenchResult]:
    if not torch.cuda.is_available():
        from gptoss.errors import GptOssError

        raise GptOssError("gptoss bench needs a CUDA GPU")
    device = "cuda"
    started = _sync_time()
    if args.checkpoint:
        model, name = load_model(args.checkpoint, device=device, progress=None), str(args.checkpoint)
    else:
        model, name = random_model(args.preset, device), f"{args.preset} (random weights)"
    load_s = _sync_time() - started
    if args.serve:
        served = bench_engine(model, args.serve, prompt_length=1024, output_tokens=256,
                              max_prefill_tokens=args.max_prefill_tokens)
        print(f"engine: {served['concurrency']} concurrent requests x (1024 prompt + 256 output tokens): "
              f"{served['output_tokens_per_s']:,.0f} output tokens/s ({served['seconds']:.1f} s: "
              f"{served['prefill_steps']} prefill steps {served['prefill_seconds']:.2f} s "
              f"(GPU {served['prefill_device_seconds']:.2f} s), "
              f"{served['decode_steps']} decode steps, GPU {served['decode_device_seconds']:.2f} s; "
              f"prefix-cache hits: {served['cached_prefix_blocks']} blocks)", flush=True)
        print(f"engine: time to first token median {served['ttft_ms_median']:,.0f} ms, p99 "
              f"{served['ttft_ms_p99']:,.0f} ms; between tokens median {served['itl_ms_median']:.1f} ms, p99 "
              f"{served['itl_ms_p99']:.1f} ms", flush=True)
        built = served["kernels_built"]
        if built:  # the GPU times above then include those builds
            print(f"engine: {len(built)} kernel builds during the timed round: {', '.join(sorted(set(built)))}",
                  flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(served, f, indent=2)
        return []
    results = [bench_gptoss(model, name, load_s, args.prompt_lengths, args.decode_contexts, args.decode_tokens)]
    print(format_table(results), flush=True)
    if args.compare == "hf":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        short = [n for n in args.prompt_lengths if n <= 4096]  # eager attention materializes N x N scores
        contexts = [n for n in args.decode_contexts if n <= 4096]
        results.append(bench_transformers(model, name, short, contexts, min(args.decode_tokens, 32)))
        print(format_table(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
    return results
