"""A continuous-batching inference engine over a paged KV cache with prefix reuse.

    engine = Engine(model, max_batch_size=64, context_length=8192)
    engine.start()
    async for out in engine.generate(prompt_tokens, SamplingParams(max_tokens=256, temperature=0.7, seed=1)):
        ...  # out.token, out.logprob, out.top_logprobs, out.finish_reason

Design (the ideas of nano-vllm's scheduler and block manager, written for this model's flat-token forward):

- Storage: gptoss.paged_cache. Every request owns a block table into per-layer paged pools; blocks are freed when
  it finishes, fails or is cancelled. Sliding-window layers keep all blocks of a request (one block table serves
  every layer) and only gather the keys their window can see.
- Prefix reuse: full blocks are registered under a chained hash of their token ids once their keys/values are
  computed (prompt and generated tokens alike, so a follow-up turn reuses the whole conversation). At admission the
  leading full blocks of a request are looked up and shared (reference counted); its prefill starts at the reused
  length. At most (len - 1) // block_size blocks are reused, so the last token is always computed (its logits are
  needed). Freed blocks keep their contents and stay findable until their space is needed.
  stats()["cached_prefix_blocks"] counts the blocks served from that cache so far (cumulative hits);
  the first TokenOutput of a request carries `cached_tokens`, the prompt tokens it did not recompute.
- Scheduling: one background thread runs steps. A step either *prefills* newly admitted requests (one forward over
  their packed uncomputed tokens) or *decodes* one token for every running request (one forward over the batch).
  Prefill has priority, like vLLM's default scheduler. Admission is first come, first served: the head of the
  queue is admitted while the batch has room (max_batch_size), the step's prefill budget (max_prefill_tokens) and
  free blocks for all its tokens. Otherwise requests wait in the queue; nothing crashes for lack of memory.
- Chunked prefill: a prompt longer than max_prefill_tokens is admitted alone and prefilled over several steps of at
  most that many tokens (the model continues a prefill over the cache, as prefix reuse does); only its last chunk
  samples. After each chunk the running requests get a decode step, so a long prompt delays their tokens by a chunk
  at a time instead of by its whole prefill; waiting requests are admitted once it is through.
- Preemption: when a running request needs a new block (its tokens crossed a block boundary) and none is free, the
  newest running request is preempted: its blocks are released (their computed full blocks stay in the prefix
  cache) and it goes back to the front of the queue with its tokens so far; when it is admitted again it
  recomputes what the prefix cache no longer holds and continues. Its sampler state is kept, so greedy and seeded
  outputs are unaffected. A request never exceeds what the whole cache can hold (checked up front), so the oldest
  running request always makes progress.
- Sampling: per request, with its own params, a step's rows in one call (gptoss.sampling). Randomness is keyed
  by (the request's seed, its draw count) (see gptoss.sampling), so seeded outputs equal the request run alone,
  whatever the batch; unseeded requests get a random seed. Logprobs are the log-softmax of the unscaled logits.
- Threading: results go to each request's asyncio queue through loop.call_soon_threadsafe, a step's results to
  one event loop in one call. An exception in a step fails the requests of that step (their generate iterator
  raises EngineError) and frees their blocks; the loop keeps running. A consumer that stops iterating (aclose,
  task cancellation, client disconnect) cancels its request and frees its blocks.
- Compute: `_forward` runs a step. On the CPU the pure model runs through PagedKVCache, whose attention over a
  packed step costs O(step tokens x gathered keys). On CUDA, gptoss.cuda_cache.TritonPagedKVCache runs the Triton
  kernels (flash prefill per sequence, split-K decode reading the pools through the block tables), the MoE runs
  its Triton kernels, and decode steps replay CUDA graphs captured per batch-size bucket (gptoss.cuda_graph).
- Tensor/expert parallel (a model built with a gptoss.parallel.Shard, under torchrun): rank 0's engine schedules
  and samples; before each forward it sends the step (tokens, block tables, positions) to the other ranks, whose
  engines run `follow()`: the same forward over their shard and their own paged cache (same blocks, their KV
  heads), until rank 0's engine stops (warm-up runs the same way). On CUDA a shard runs the Triton kernels and
  caches like one process, but its decode steps run eagerly: its collectives are not captured in graphs. A step
  that raises on one rank only (out of memory, say) leaves the others waiting in its collectives: the server must
  be restarted then.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gptoss.errors import ContextLengthError, GptOssError
from gptoss.host_copy import HostCopy, to_device
from gptoss.kernels import triton_device
from gptoss.paged_cache import BlockManager, PagedKVCache, block_hash
from gptoss.sampling import check_settings, request_seed, sample

MAX_TOP_LOGPROBS = 20


class EngineError(RuntimeError):
    """A request failed inside the engine (a step raised, or the engine stopped); __cause__ holds the original."""


@dataclass
class SamplingParams:
    max_tokens: int  # tokens to generate at most
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = (200002, 200012)  # generation ends after yielding one of these
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20


@dataclass
class TokenOutput:
    token: int
    logprob: float | None = None  # log-softmax of the unscaled logits
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (stop token) or "length" on the last token, else None
    cached_tokens: int | None = None  # on the first output only: prompt tokens reused from the prefix cache


class _Request:
    __slots__ = ("id", "tokens", "prompt_len", "params", "stop", "seed", "draws", "loop", "queue", "block_table",
                 "block_hashes", "hash_memo", "num_computed", "feed_end", "num_generated", "cached_tokens", "state",
                 "cancelled")

    def __init__(self, rid, tokens, params, seed, loop):
        self.id = rid
        self.tokens: list[int] = tokens  # prompt + generated so far
        self.prompt_len = len(tokens)
        self.params: SamplingParams = params
        self.stop = frozenset(int(t) for t in params.stop_token_ids)
        self.seed = seed
        self.draws = 0  # tokens sampled so far (steps launched ahead included): the next draw's index
        self.loop: asyncio.AbstractEventLoop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the leading full computed blocks
        self.hash_memo: tuple[int, list[bytes]] = (-1, [])  # (len(tokens), chained hashes of its reusable blocks)
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.feed_end = 0  # the scheduled step feeds tokens[num_computed:feed_end] (short of the end: a chunk)
        self.num_generated = 0
        self.cached_tokens: int | None = None  # set at first admission
        self.state = "new"  # new -> waiting <-> running -> done
        self.cancelled = False


class _DeviceSpan:
    """GPU time between construction and end() on the current CUDA stream (0 off CUDA); read it once the stream
    has passed end(), e.g. after a .tolist() of later work."""

    def __init__(self, device: torch.device):
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()

    def end(self) -> None:
        if self._events:
            self._events[1].record()

    def seconds(self) -> float:
        return self._events[0].elapsed_time(self._events[1]) / 1000 if self._events else 0.0


class Engine:
    """Continuous batching over a paged KV cache (see the module docstring).

    context_length: per-request limit on prompt + generated tokens.
    num_blocks: KV cache blocks of block_size tokens. Default: enough for a quarter of max_batch_size full-context
    requests, i.e. ceil(max_batch_size * context_length / 4 / block_size), and at least one full-context request.
    (gpt-oss-20b in bf16 stores 48 KiB per token: the defaults, 64 x 8192 / 4 tokens, take 6 GiB.)
    max_prefill_tokens: tokens one prefill step packs at most (a longer prompt is prefilled in chunks). Larger steps
    keep the MoE GEMM busier and dequantize the experts fewer times (on an H100, 64 requests of 1k tokens prefill in
    1.04 s of GPU time with 8192, 0.94 s with 16384, 0.89-0.92 s with 32768) at the cost of more activation memory a
    step and a later first token for the first requests of a burst. The running requests' decoding waits for the
    prefill of every request admitted at once (prefill has priority), so there the step size does not lengthen that
    pause; a longer prompt's chunks alternate with decode steps, so there it bounds the pause.
    enable_prefix_caching: reuse computed full blocks across requests.
    launch_ahead: launch each step before the previous step's tokens reach the host, so that the GPU computes while
    the host delivers tokens and schedules: a decode step's tokens feed the next decode step on the device, and a
    prefill step is followed by the prefill of more waiting requests. Default: on CUDA, where it hides the host's
    per-step work; on the CPU the step would run before the tokens are delivered, delaying each by a step.
    """

    def __init__(self, model, *, max_batch_size: int = 64, context_length: int = 8192, block_size: int = 16,
                 num_blocks: int | None = None, max_prefill_tokens: int = 8192, enable_prefix_caching: bool = True,
                 launch_ahead: bool | None = None):
        config = model.config
        if max_batch_size <= 0:
            raise GptOssError(f"max_batch_size must be positive, got {max_batch_size}")
        if not 0 < context_length <= config.max_context_length:
            raise ContextLengthError(
                f"context length {context_length} is outside 1..{config.max_context_length} (the model's maximum)"
            )
        if block_size <= 0:
            raise GptOssError(f"block_size must be positive, got {block_size}")
        if max_prefill_tokens <= 0:
            raise GptOssError(f"max_prefill_tokens must be positive, got {max_prefill_tokens}")
        if num_blocks is None:
            num_blocks = max(-(-context_length // block_size), -(-max_batch_size * context_length // (4 * block_size)))
        self.model = model
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_prefill_tokens = max_prefill_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = BlockManager(num_blocks, block_size)
        self.decode_steps = None
        self.launch_ahead = model.device.type == "cuda" if launch_ahead is None else launch_ahead
        self.shard = model.shard
        if triton_device(model.embedding.weight):
            from gptoss.cuda_cache import TritonPagedKVCache
            from gptoss.cuda_graph import GraphedBatchDecode

            self.cache = TritonPagedKVCache(model.local_config, num_blocks, block_size, device=model.device,
                                            dtype=model.dtype)
            self.decode_steps = GraphedBatchDecode(model, self.cache, max_batch_size, context_length,
                                                   capture_graphs=not self.shard.parallel)
        else:
            self.cache = PagedKVCache(model.local_config, num_blocks, block_size, device=model.device,
                                      dtype=model.dtype)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self.num_preemptions = 0
        self._chunk_launched = False  # the last step launched left a prompt part way through its prefill
        # per kind of step: [steps, tokens fed, seconds of forward + sampling, seconds of the forward on the device]
        self._step_totals = {"prefill": [0, 0, 0.0, 0.0], "decode": [0, 0, 0.0, 0.0]}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def warm_up(self, progress: bool = False) -> None:
        """On CUDA, before start(): runs a prefill of each size bucket the MoE GEMM tunes for (powers of two from
        32 tokens up to max_prefill_tokens) and one decode step of each batch-size bucket (capturing its CUDA
        graph), on scratch blocks. A fresh machine otherwise autotunes and captures while serving, stalling every
        running request for seconds; Triton keeps the tuned configs on disk, so later processes warm up quickly.
        No-op off CUDA. In a tensor/expert-parallel group every rank calls it: rank 0 runs the steps, which the
        other ranks follow (their collectives must meet) until rank 0's warm-up ends."""
        if self.decode_steps is None:
            return
        if self._thread is not None:
            raise EngineError("warm_up() must run before start()")
        if self.shard.parallel and self.shard.rank != 0:
            self.follow()
            return
        limit = min(self.max_prefill_tokens, self.context_length, self.num_blocks * self.block_size)
        prefills = [2**i for i in range(5, limit.bit_length())]  # 32 .. the largest power of two <= limit
        vocab = self.model.config.vocab_size
        steps = [(n, False) for n in prefills] + [(b, True) for b in self.decode_steps.buckets]
        for n, decode in tqdm(steps, desc="warming up", unit="step", disable=not progress):
            # a decode warm-up row per sequence, sequences sharing blocks when there are fewer blocks than rows
            blocks = [self.blocks.allocate() for _ in range(min(n, self.num_blocks) if decode
                                                                else self.blocks.blocks_for(n))]
            try:
                entries = [([blocks[i % len(blocks)]], 0, 1) for i in range(n)] if decode else [(blocks, 0, n)]
                with torch.inference_mode():
                    self._forward(torch.randint(vocab, (n,), device=self.model.device), entries)
            finally:
                self.blocks.release_all(blocks)
        if self.shard.parallel:
            self.shard.object_from_first(None)  # the followers' warm-up ends
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def start(self) -> None:
        """Starts the background step loop (idempotent)."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the step loop after its current step; pending requests fail with EngineError. In a parallel
        group, the other ranks' follow() returns."""
        with self._cv:
            thread = self._thread
            self._stopping = True
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self.shard.parallel and thread is not None:
            self.shard.object_from_first(None)
        with self._cv:
            self._thread = None
            err = EngineError("the engine was stopped")
            for req in list(self._waiting) + list(self._running):
                self._fail(req, err)

    def stats(self) -> dict:
        """running / waiting requests; free_blocks (no user; includes blocks that still hold a reusable prefix);
        total_blocks; cached_prefix_blocks (cumulative prefix-cache hits, in blocks); hashed_blocks (blocks now
        findable by prefix hash); preemptions (so far); prefill_steps / prefill_tokens / prefill_seconds /
        prefill_device_seconds and the same for decode steps, i.e. steps that feed one token per sequence
        (cumulative; tokens: fed, including the rows a step launched ahead computes for requests that stopped;
        seconds: wall time from a step's launch until its tokens are read, so steps launched ahead (launch_ahead)
        overlap; device_seconds: on CUDA, the GPU's time from the forward's first work to its end, 0 elsewhere)."""
        with self._cv:
            totals = {f"{kind}_{name}": value for kind, values in self._step_totals.items()
                      for name, value in zip(("steps", "tokens", "seconds", "device_seconds"), values)}
            return {
                **totals,
                "running": len(self._running),
                "waiting": len(self._waiting),
                "free_blocks": self.blocks.num_free,
                "total_blocks": self.blocks.num_blocks,
                "cached_prefix_blocks": self.blocks.prefix_hit_blocks,
                "hashed_blocks": self.blocks.num_cached,
                "preemptions": self.num_preemptions,
            }

    # -- requests ----------------------------------------------------------------------------------------------
    def check_request(self, prompt_tokens: Sequence[int], params: SamplingParams) -> list[int]:
        """Validates a request synchronously (generate does it too); returns the prompt as a list of ints.
        Raises ContextLengthError or GptOssError."""
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise GptOssError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise GptOssError(f"prompt token ids must be in 0..{vocab - 1}")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise GptOssError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
        check_settings(params.temperature, params.top_k, params.top_p)
        if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
            raise GptOssError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {params.top_logprobs}")
        total = len(prompt) + params.max_tokens
        if total > self.context_length:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = {total} exceeds the context "
                f"length of {self.context_length}"
            )
        capacity = self.num_blocks * self.block_size
        if total > capacity:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = {total} exceeds the KV cache's "
                f"capacity of {capacity} tokens"
            )
        return prompt

    async def generate(self, prompt_tokens: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        """Yields one TokenOutput per generated token; the last one has finish_reason set. Raises
        ContextLengthError / GptOssError on the first iteration for a bad request (before anything is queued),
        EngineError if the engine fails the request. Stopping iteration early cancels the request."""
        prompt = self.check_request(prompt_tokens, params)
        req = _Request(next(self._ids), prompt, params, request_seed(params.seed), asyncio.get_running_loop())
        self.start()
        with self._cv:
            req.state = "waiting"
            self._waiting.append(req)
            self._cv.notify_all()
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._cancel(req)

    def _cancel(self, req: _Request) -> None:
        with self._cv:
            if req.state == "done":
                return
            req.cancelled = True
            if req.state == "waiting":
                self._waiting.remove(req)
                self._release(req)
            # a running request is reaped by the step thread (its blocks may be in use by the current step)
            self._cv.notify_all()

    # -- bookkeeping (lock held) -------------------------------------------------------------------------------
    def _release(self, req: _Request) -> None:
        """Frees the request's blocks and marks it done (it must already be out of waiting/running)."""
        self.blocks.release_all(req.block_table)
        req.block_table = []
        req.hash_memo = (-1, [])
        req.state = "done"

    def _emit(self, req: _Request, item) -> bool:
        return self._emit_all(req.loop, [(req, item)])

    @staticmethod
    def _emit_all(loop: asyncio.AbstractEventLoop, items: list) -> bool:
        """Puts each (request, item) into its request's queue with one wake-up of their event loop (a step's
        tokens: one per request), not one each. False when the loop is closed."""
        def put_all():
            for req, item in items:
                req.queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
            return True
        except RuntimeError:  # its event loop is closed: nobody is listening
            return False

    def _fail(self, req: _Request, err: BaseException) -> None:
        if req.state == "done":
            return
        if req in self._running:
            self._running.remove(req)
        elif req in self._waiting:
            self._waiting.remove(req)
        self._release(req)
        self._emit(req, err)

    def _finish(self, req: _Request) -> None:
        self._running.remove(req)
        self._release(req)

    def _preempt(self, req: _Request) -> None:
        self.num_preemptions += 1
        self._running.remove(req)
        self.blocks.release_all(req.block_table)
        req.block_table = []
        req.block_hashes = []
        req.num_computed = 0
        req.state = "waiting"
        self._waiting.appendleft(req)

    def _match_prefix(self, req: _Request) -> tuple[list[int], list[bytes]]:
        """Cached blocks for the request's leading full blocks (never the block of its last token)."""
        hits, hashes = [], []
        if not self.enable_prefix_caching:
            return hits, hashes
        bs = self.block_size
        if req.hash_memo[0] != len(req.tokens):  # a waiting request is looked up at every step: hash it once
            chain, prev = [], None
            for i in range((len(req.tokens) - 1) // bs):
                prev = block_hash(prev, req.tokens[i * bs : (i + 1) * bs])
                chain.append(prev)
            req.hash_memo = (len(req.tokens), chain)
        for i, h in enumerate(req.hash_memo[1]):
            block = self.blocks.lookup(h, req.tokens[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
            hashes.append(h)
        return hits, hashes

    def _register_blocks(self, req: _Request) -> None:
        """Registers the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(req.block_hashes) < req.num_computed // bs:
            i = len(req.block_hashes)
            chunk = req.tokens[i * bs : (i + 1) * bs]
            h = block_hash(req.block_hashes[-1] if req.block_hashes else None, chunk)
            self.blocks.register(req.block_table[i], h, chunk)
            req.block_hashes.append(h)

    @staticmethod
    def _prefilling(req: _Request) -> bool:
        """Whether a running request's prompt is part way through a chunked prefill (more than the one uncomputed
        token a decoding request has)."""
        return len(req.tokens) - req.num_computed > 1

    def _schedule(self) -> list[_Request]:
        """Picks the next step's requests and sets what each feeds (feed_end): the next chunks of prompts part way
        through their prefill, where a step before left one (but after such a step, the decoding requests' step
        first, so that a long prompt does not stall them); else newly admitted requests (a prefill) if any; else
        every running request (a decode)."""
        for req in [r for r in self._running if r.cancelled]:
            self._finish(req)
        chunked = [r for r in self._running if self._prefilling(r)]
        if chunked and not (self._chunk_launched and len(chunked) < len(self._running)):
            return self._next_chunks(chunked)
        admitted = [] if chunked else self._admit()
        if admitted:
            return admitted
        batch = []
        for req in list(self._running):  # oldest first; the newest are preempted first
            if req.state != "running" or self._prefilling(req):
                continue
            while len(req.tokens) > len(req.block_table) * self.block_size:
                if self.blocks.num_free == 0:
                    self._preempt(self._running[-1])
                    if req.state != "running":
                        break
                else:
                    req.block_table.append(self.blocks.allocate())
            if req.state == "running":
                req.feed_end = len(req.tokens)
                batch.append(req)
        return batch

    def _next_chunks(self, chunked: list[_Request]) -> list[_Request]:
        """The next prefill step of requests part way through their prompts, first admitted first, within the step's
        token budget (the first always gets a chunk)."""
        batch, budget = [], self.max_prefill_tokens
        for req in chunked:
            if budget <= 0:
                break
            req.feed_end = min(len(req.tokens), req.num_computed + budget)
            budget -= req.feed_end - req.num_computed
            batch.append(req)
        return batch

    def _admit(self, in_flight: frozenset[bytes] = frozenset()) -> list[_Request]:
        """(lock held) Admits waiting requests, first come first served, while the batch has room, the step's
        prefill token budget lasts and their blocks are free -> them (the next step prefills them; a first request
        longer than the budget, its first chunk: chunked prefill, whose steps take max_prefill_tokens at most).
        in_flight: hashes of blocks that a step still running computes (a prefill launched ahead): admission stops
        at a request whose next uncached block is one of them, so that it reuses the block once registered."""
        admitted: list[_Request] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            req = self._waiting[0]
            hits, hashes = self._match_prefix(req)
            chain = req.hash_memo[1]
            if len(chain) > len(hits) and chain[len(hits)] in in_flight:
                break
            to_compute = len(req.tokens) - len(hits) * self.block_size
            if admitted and to_compute > budget:
                break
            need = self.blocks.blocks_for(len(req.tokens)) - len(hits)
            free_hits = sum(1 for b in hits if self.blocks.ref_count[b] == 0)
            if self.blocks.num_free - free_hits < need:
                break  # first come, first served: the head of the queue waits for blocks
            for b in hits:
                self.blocks.acquire(b)
            req.block_table = hits + [self.blocks.allocate() for _ in range(need)]
            req.block_hashes = hashes
            req.num_computed = len(hits) * self.block_size
            self.blocks.prefix_hit_blocks += len(hits)
            if req.cached_tokens is None:
                req.cached_tokens = req.num_computed
            req.state = "running"
            req.feed_end = req.num_computed + min(to_compute, budget)
            self._waiting.popleft()
            admitted.append(req)
            budget -= to_compute
        self._running.extend(admitted)
        return admitted

    # -- the step loop -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopping:
                    return
                try:
                    batch = self._schedule()
                except Exception as e:  # a bookkeeping bug: fail everyone rather than spin
                    err = EngineError(f"engine scheduling failed: {e!r}")
                    err.__cause__ = e
                    for req in list(self._waiting) + list(self._running):
                        self._fail(req, err)
                    continue
                if not batch:
                    # waiting requests that cannot be admitted and nothing running cannot happen (each request
                    # fits the cache alone); wait for a cancellation or a new request rather than spin
                    self._cv.wait(timeout=0.05)
                    continue
            try:
                self._step(batch)
            except Exception as e:  # _step fails its own batch on model errors; this is a safety net for the rest
                self._fail_all(batch, e)

    def _step(self, batch: list[_Request]) -> None:
        """Runs the scheduled step, then the steps launched ahead of it while there are any (see launch_ahead)."""
        step = self._launch_scheduled(batch)
        while step is not None:
            step = self._complete(step)

    def _launch_scheduled(self, batch: list[_Request]) -> _LaunchedStep | None:
        """Launches a step feeding each request's tokens[num_computed:feed_end]; on an error fails the batch."""
        try:
            with torch.inference_mode():
                entries = [(r.block_table, r.num_computed, r.feed_end) for r in batch]
                flat = [t for r in batch for t in r.tokens[r.num_computed : r.feed_end]]
                chunks = {i: r.feed_end for i, r in enumerate(batch) if r.feed_end < len(r.tokens)}
                return self._launch(batch, to_device(flat, self.model.device), entries, chunks)
        except Exception as e:
            self._fail_all(batch, e)
            return None

    def _launch(self, batch: list[_Request], tokens: torch.Tensor, entries, chunks: dict[int, int] | None = None
                ) -> _LaunchedStep:
        """Enqueues a step's forward and sampling; its outputs are read later (_complete). chunks: {row: end} of
        the rows that feed a chunk of their prompt short of its end, and sample nothing."""
        chunks = chunks or {}
        started = time.perf_counter()
        span = _DeviceSpan(tokens.device)
        logits = self._forward(tokens, entries)
        span.end()
        rows = [i for i in range(len(batch)) if i not in chunks]  # the rows that sample
        self._chunk_launched = bool(chunks)
        if chunks:
            logits = logits[to_device(rows, logits.device)] if rows else logits[:0]
        kind = "decode" if len(tokens) == len(batch) and not chunks else "prefill"
        return _LaunchedStep(batch, chunks, kind, len(tokens), started, span,
                             self._sample([batch[i] for i in rows], logits))

    def _complete(self, step: _LaunchedStep) -> _LaunchedStep | None:
        """Launches the next step ahead if it can (after a decode, the same batch's next decode; after a prefill,
        a prefill of more waiting requests, which needs nothing from this one), then reads this step's tokens and
        delivers them. Returns the step launched ahead."""
        ahead = None
        try:
            with torch.inference_mode():
                if self.launch_ahead and step.kind == "decode":
                    with self._cv:
                        plan = self._plan_ahead(step.batch)
                    if plan is not None:
                        rows, batch, entries = plan
                        ahead = self._launch(batch, step.sampled.tokens[rows], entries)
                elif self.launch_ahead:
                    with self._cv:
                        chunking = step.chunks or any(self._prefilling(r) for r in self._running
                                                      if r not in step.batch)  # its next chunk goes first
                        computing = frozenset(h for r in step.batch for h in r.hash_memo[1])
                        admitted = [] if self._stopping or chunking else self._admit(computing)
                    if admitted:
                        ahead = self._launch_scheduled(admitted)
                outputs = step.sampled.read()
        except Exception as e:
            self._fail_all(step.batch, e)
            if ahead is not None:  # a prefill launched ahead holds other requests
                self._fail_all(ahead.batch, e)
            return None
        with self._cv:
            totals = self._step_totals[step.kind]
            totals[0] += 1
            totals[1] += step.num_tokens
            totals[2] += time.perf_counter() - step.started  # outputs were read: the device is done with it
            totals[3] += step.span.seconds()
            for row, end in step.chunks.items():  # computed part of its prompt: no token yet
                req = step.batch[row]
                if req.state == "running" and not req.cancelled:
                    req.num_computed = end
                    self._register_blocks(req)
            deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Request, TokenOutput]]] = {}
            sampled = [r for i, r in enumerate(step.batch) if i not in step.chunks]
            for req, out in zip(sampled, outputs):
                if req.state != "running":  # finished, failed or preempted (a step launched ahead may hold it)
                    continue
                if req.cancelled:
                    self._finish(req)
                    continue
                req.num_computed = len(req.tokens)
                req.tokens.append(out.token)
                req.num_generated += 1
                self._register_blocks(req)
                if out.token in req.stop:
                    out.finish_reason = "stop"
                elif req.num_generated >= req.params.max_tokens:
                    out.finish_reason = "length"
                if req.num_generated == 1:
                    out.cached_tokens = req.cached_tokens
                deliveries.setdefault(req.loop, []).append((req, out))
                if out.finish_reason is not None:
                    self._finish(req)
            for loop, items in deliveries.items():
                if not self._emit_all(loop, items):  # nobody is listening
                    for req, _ in items:
                        if req.state == "running":
                            self._finish(req)
        return ahead

    def _plan_ahead(self, batch: list[_Request]):
        """(lock held) The next decode step of `batch`, planned before its tokens are known: the requests that
        continue unless their pending token is a stop token (not cancelled, below max_tokens), each feeding that
        token at position len(tokens), with the blocks it needs allocated now. None when the next step should be
        scheduled instead: the batch leaves out running requests (a prefill of the newly admitted only), requests
        wait while the batch has room to admit them, the engine stops, a block is missing (preemption is the
        scheduler's), or nobody continues. -> (rows of `batch` that continue, those requests, their entries)."""
        members = set(batch)
        if (self._stopping or any(r not in members for r in self._running)
                or (self._waiting and len(self._running) < self.max_batch_size)):
            return None
        rows = [i for i, r in enumerate(batch) if r.state == "running" and not r.cancelled
                and r.num_generated + 1 < r.params.max_tokens]
        missing = [max(0, self.blocks.blocks_for(len(batch[i].tokens) + 1) - len(batch[i].block_table)) for i in rows]
        if not rows or sum(missing) > self.blocks.num_free:
            return None
        entries = []
        for i, count in zip(rows, missing):
            req = batch[i]
            req.block_table.extend(self.blocks.allocate() for _ in range(count))
            entries.append((req.block_table, len(req.tokens), len(req.tokens) + 1))
        return to_device(rows, self.model.device), [batch[i] for i in rows], entries

    def _fail_all(self, batch: list[_Request], e: Exception) -> None:
        with self._cv:
            for req in batch:
                err = EngineError(f"engine step failed: {e!r}")
                err.__cause__ = e
                self._fail(req, err)

    def follow(self) -> None:
        """On a rank other than 0 of a parallel group: runs the forward of every step rank 0's engine runs, over this
        rank's shard and cache, until that engine stops (or its warm-up ends)."""
        while (step := self.shard.object_from_first(None)) is not None:
            count, dtype, entries = step
            tokens = self.shard.tensor_from_first(torch.empty(count, dtype=dtype, device=self.model.device))
            with torch.inference_mode():
                self._forward(tokens, entries)

    def _forward(self, tokens: torch.Tensor, entries) -> torch.Tensor:
        """(N,) packed tokens of the step's sequences (entries: (block_table, start, end) each) -> logits (B, V)
        of each sequence's last fed token. On CUDA attention and MoE run as Triton kernels, and decode steps (one
        token per sequence) replay CUDA graphs (a shard's run eagerly). On rank 0 of a parallel group, the other
        ranks follow."""
        if self.shard.parallel and self.shard.rank == 0:
            self.shard.object_from_first((len(tokens), tokens.dtype, entries))
            self.shard.tensor_from_first(tokens)
        if self.decode_steps is not None and len(tokens) == len(entries):
            return self.decode_steps(tokens, entries)
        ends = itertools.accumulate(end - start for _, start, end in entries)  # packed row after each sequence
        logits_rows = to_device(list(ends), tokens.device) - 1
        positions = self.cache.prepare(entries)
        try:
            return self.model(tokens, positions, self.cache, logits_rows=logits_rows)
        finally:
            self.cache.finish()

    def _sample(self, batch: list[_Request], logits: torch.Tensor) -> _SampledTokens:
        """logits (B, V), one row per request -> the sampled tokens (and the logprobs asked for) on the device,
        on their way to the host. Everything that reads logits is enqueued here: a step launched ahead overwrites
        a graph's logits."""
        params = [req.params for req in batch]
        chosen = sample(logits, [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                        [req.seed for req in batch], [req.draws for req in batch])
        for req in batch:
            req.draws += 1
        want = [i for i, req in enumerate(batch) if req.params.logprobs or req.params.top_logprobs > 0]
        picked = top = None
        if want:
            idx = to_device(want, logits.device)
            logp = torch.log_softmax(logits[idx].float(), dim=-1)
            picked = logp.gather(1, chosen[idx][:, None])[:, 0]
            k = max(batch[i].params.top_logprobs for i in want)
            if k > 0:
                top = torch.topk(logp, k, dim=-1)
        return _SampledTokens(chosen, want, [batch[i].params.top_logprobs for i in want], picked, top)


class _SampledTokens:
    """A step's sampled tokens, with the logprobs of the rows `want` (picked (W,), top: topk of (W, V)), on the
    device (`tokens` feeds a step launched ahead) and being copied to pinned host memory."""

    def __init__(self, tokens: torch.Tensor, want: list[int], top_counts: list[int], picked, top):
        self.tokens = tokens
        self.want, self.top_counts = want, top_counts
        tensors = [tokens]
        if picked is not None:
            tensors.append(picked)
        if top is not None:
            tensors += [top.values, top.indices]
        self._host = HostCopy(*tensors)

    def read(self) -> list[TokenOutput]:
        """Waits for the copies (not for work enqueued after them) -> one TokenOutput per row."""
        host = self._host.wait()
        outputs = [TokenOutput(token=t) for t in host[0].tolist()]
        if self.want:
            picked = host[1].tolist()
            top_vals, top_ids = (host[2].tolist(), host[3].tolist()) if len(host) > 2 else (None, None)
            for row, (i, k) in enumerate(zip(self.want, self.top_counts)):
                outputs[i].logprob = picked[row]
                if k > 0:
                    outputs[i].top_logprobs = list(zip(top_ids[row][:k], top_vals[row][:k]))
        return outputs


@dataclass
class _LaunchedStep:
    batch: list[_Request]
    chunks: dict[int, int]  # rows that feed a chunk of their prompt short of its end: the chunk's end
    kind: str  # "decode" (one token per sequence, each sampled) or "prefill"
    num_tokens: int  # tokens fed
    started: float  # perf_counter at launch
    span: _DeviceSpan
    sampled: _SampledTokens  # the other rows' tokens
