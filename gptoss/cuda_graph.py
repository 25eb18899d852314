"""One decode step (one token, batch 1) captured in a CUDA graph and replayed for every generated token."""

import torch


class GraphedDecodeStep:
    """Replays model(token, position, cache) -> logits (V,) with static buffers; captured on first use."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        device = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def _capture(self):
        # warm up on a side stream (Triton compiles, cuBLAS picks algorithms), then capture. The warm-up writes
        # k/v for the current position, which the real step overwrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(self.token, self.position, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model(self.token, self.position, self.cache)[0]

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token.view(1), non_blocking=True)
        self.position.fill_(position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
