"""Decode steps captured in CUDA graphs: one token of one sequence (TokenGenerator), or one token for each of a
batch of sequences over the paged cache (the engine), per batch-size bucket."""

import torch

from gptoss.cuda_cache import DecodeStep, TritonPagedKVCache


def capture(step):
    """Runs `step()` twice on a side stream (Triton compiles, cuBLAS picks algorithms), then records it in a CUDA
    graph. Returns (graph, the output tensor the graph writes on each replay). The warm-up runs write k/v only into
    the slots the real step writes again."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph, output


class GraphedDecodeStep:
    """Replays model(token, position, cache) -> logits (V,) with static buffers; captured on first use."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        device = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token.view(1), non_blocking=True)
        self.position.fill_(position)
        if self.graph is None:
            self.graph, self.logits = capture(lambda: self.model(self.token, self.position, self.cache)[0])
        self.graph.replay()
        return self.logits


class GraphedBatchDecode:
    """The engine's decode steps: graphs captured per batch-size bucket (powers of two up to max_batch), smaller
    batches padded up to their bucket. Captured on first use of each bucket. capture_graphs=False runs each step
    eagerly over the same static metadata instead (a tensor/expert-parallel shard: its collectives stay out of
    graphs)."""

    def __init__(self, model, cache: TritonPagedKVCache, max_batch: int, max_context: int,
                 capture_graphs: bool = True):
        self.model, self.cache = model, cache
        self.capture_graphs = capture_graphs
        self.step = DecodeStep(cache, max_batch, max_context)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=cache.device)
        self.buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def __call__(self, tokens: torch.Tensor, entries) -> torch.Tensor:
        """tokens (B,) on the device, entries [(block_table, start, start + 1)] -> logits (B, V)."""
        batch = len(entries)
        bucket = next(b for b in self.buckets if b >= batch)
        self.step.fill(entries, bucket)
        self.tokens[:batch].copy_(tokens)
        if not self.capture_graphs:
            return self._run(bucket, lambda step: step())[:batch]
        if bucket not in self.graphs:
            self.graphs[bucket], self.logits[bucket] = self._run(bucket, capture)
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]

    def _run(self, bucket: int, how):
        """how(step): the model's step over the bucket's static metadata, run (or captured) with the cache reading
        that metadata."""
        view = self.step.view(bucket)
        tokens = self.tokens[:bucket]
        self.cache.decode_step = view
        try:
            return how(lambda: self.model(tokens, view.positions, self.cache))
        finally:
            self.cache.decode_step = None
