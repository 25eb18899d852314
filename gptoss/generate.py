"""KV-cached token generation: the prompt is prefilled (in chunks when long), then one token per step."""

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gptoss.errors import ContextLengthError, GptOssError
from gptoss.host_copy import HostCopy
from gptoss.kernels import triton_device
from gptoss.kv_cache import KVCache
from gptoss.model import Transformer
from gptoss.sampling import check_settings, request_seed, sample

DEFAULT_CONTEXT_LENGTH = 8192
# Prompt tokens one prefill forward takes at most: a longer prompt is prefilled in chunks, so that its activations
# (roughly 10 GB at 131k tokens of gpt-oss-20b in one forward, by a count of its tensors) fit beside the weights
# and the cache on smaller cards.
DEFAULT_MAX_PREFILL_TOKENS = 16384


class TokenGenerator:
    """Generates from a checkpoint folder (or an already loaded `model=`) on `device`.

    context_length: tokens the KV cache holds (prompt + generated); defaults to 8192, at most the model's 131072.
    max_prefill_tokens: prompt tokens one prefill forward takes at most (a longer prompt is prefilled in chunks).
    """

    def __init__(
        self,
        checkpoint: str | Path | None,
        device: str | torch.device = "cpu",
        *,
        context_length: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        model: Transformer | None = None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ):
        if max_prefill_tokens <= 0:
            raise GptOssError(f"max_prefill_tokens must be positive, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.device = torch.device(device)
        if model is None:
            if checkpoint is None:
                raise GptOssError("TokenGenerator needs a checkpoint folder or a model")
            model = Transformer.from_checkpoint(checkpoint, device=self.device, dtype=dtype)
        self.model = model
        config = model.config
        self.context_length = context_length or min(DEFAULT_CONTEXT_LENGTH, config.max_context_length)
        self.graphed_decode = None
        # GPU: Triton attention over the cache (a tensor/expert-parallel shard's: its heads), decode in a CUDA
        # graph in one process; a shard steps eagerly, its collectives not captured in graphs.
        if triton_device(model.embedding.weight):
            from gptoss.cuda_cache import TritonKVCache
            from gptoss.cuda_graph import GraphedDecodeStep

            self.cache = TritonKVCache(model.local_config, self.context_length, device=self.device, dtype=model.dtype)
            if not model.shard.parallel:
                self.graphed_decode = GraphedDecodeStep(model, self.cache)
        else:
            self.cache = KVCache(model.local_config, self.context_length, device=self.device, dtype=model.dtype)

    def check_request(self, prompt: Sequence[int], max_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> None:
        """Raises GptOssError for an empty or out-of-vocabulary prompt or sampling settings sample() does not take,
        ContextLengthError if the prompt cannot fit."""
        check_settings(temperature, top_k, top_p)
        if not prompt:
            raise GptOssError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise GptOssError(f"prompt token ids must be in 0..{vocab - 1}")
        if len(prompt) + max(max_tokens, 1) > self.context_length:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + {max(max_tokens, 1)} to generate exceeds the context length "
                f"of {self.context_length}"
            )

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: Sequence[int],
        stop_tokens: Sequence[int] = (),
        temperature: float = 1.0,
        max_tokens: int = 0,
        return_logprobs: bool = False,
        *,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Iterator[int] | Iterator[tuple[int, float]]:
        """Yields generated tokens (or (token, logprob) with return_logprobs), the stop token included.

        max_tokens 0 means until a stop token or the end of the context (which raises ContextLengthError).
        logprob is the token's log-probability under the unscaled model distribution, as in the reference.
        """
        prompt = [int(t) for t in prompt_tokens]
        self.check_request(prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        stop = set(int(t) for t in stop_tokens)
        seed = self.model.shard.from_first(request_seed(seed), self.device)  # ranks must draw alike
        self.cache.reset()
        logits = self._prefill(prompt)
        generated = 0
        while True:
            token = sample(logits[None], temperature, top_k, top_p, [seed], [generated])[0]
            logprob = None
            if return_logprobs:  # gather, not [token]: indexing by a device scalar waits for the sampling
                logprob = torch.log_softmax(logits.float(), dim=-1).gather(0, token.view(1))[0]
            generated += 1
            room = not (max_tokens and generated >= max_tokens) and self.cache.length < self.context_length
            ahead = room and self.graphed_decode is not None
            if ahead:  # GPU: enqueue the next step before reading this token, so the GPU never waits on the host
                copy = HostCopy(*([token] if logprob is None else [token, logprob]))
                logits = self._decode(token)  # wasted only when this token turns out to be a stop token
                token, *rest = copy.wait()
                logprob = rest[0] if rest else None
            token_id = int(token)
            yield (token_id, float(logprob)) if return_logprobs else token_id
            if token_id in stop or (max_tokens and generated >= max_tokens):
                return
            if self.cache.length >= self.context_length:
                raise ContextLengthError(f"generation reached the context length of {self.context_length}")
            if not ahead:
                logits = self._decode(token)

    def _prefill(self, prompt: list[int]) -> torch.Tensor:
        """Feeds the prompt in chunks of at most max_prefill_tokens tokens, each continuing over the cache -> logits
        (V,) of its last token (each chunk computes its last row's: one row of the unembedding, simpler than none)."""
        tokens = torch.tensor(prompt, device=self.device)
        for start in range(0, len(prompt), self.max_prefill_tokens):
            chunk = tokens[start : start + self.max_prefill_tokens]
            last = torch.tensor([len(chunk) - 1], device=self.device)
            logits = self.model(chunk, self.cache.reserve(len(chunk)), self.cache, logits_rows=last)[0]
        return logits

    def _decode(self, token: torch.Tensor) -> torch.Tensor:
        """One step: token () -> logits (V,) for the next position."""
        if self.graphed_decode is not None:
            return self.graphed_decode(token, self.cache.advance(1))
        return self.model(token[None], self.cache.reserve(1), self.cache)[-1]
