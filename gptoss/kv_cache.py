"""A preallocated KV cache for one sequence.

Full-attention layers keep every position (slot = position). Sliding-window layers keep only the last `window`
positions in a ring buffer (slot = position % window), so their memory does not grow with the context.

The model calls `attend(layer, q, k, v, positions, window, sinks, sm_scale)` once per layer; here that is
`update` (store the new keys/values, return those the queries may see with the (N, S) visibility mask) followed
by the reference attention.
"""

import torch

from gptoss.config import ModelConfig
from gptoss.errors import ContextLengthError
from gptoss.kernels.attention import attention_mask, sink_attention


class ReferenceAttentionCache:
    """For caches whose `update` stores k/v and returns (keys, values, mask): attention by the reference op."""

    def attend(self, layer, q, k, v, positions, window, sinks, sm_scale):
        keys, values, mask = self.update(layer, k, v, positions, window)
        return sink_attention(q, keys, values, sinks, mask, sm_scale)


class KVCache(ReferenceAttentionCache):
    def __init__(self, config: ModelConfig, context_length: int, device=None, dtype=torch.bfloat16):
        if not 0 < context_length <= config.max_context_length:
            raise ContextLengthError(
                f"context length {context_length} is outside 1..{config.max_context_length} (the model's maximum)"
            )
        self.context_length = context_length
        self.length = 0  # tokens stored so far (host-side: the pure path slices by it)
        shape_kv = (config.num_key_value_heads, config.head_dim)
        self.keys, self.values, self.slot_positions = [], [], []
        for layer in range(config.num_hidden_layers):
            window = config.layer_window(layer)
            slots = min(window, context_length) if window else context_length
            self.keys.append(torch.zeros(slots, *shape_kv, device=device, dtype=dtype))
            self.values.append(torch.zeros(slots, *shape_kv, device=device, dtype=dtype))
            # position held by each ring slot; -1 marks an empty slot (full layers need none: slot == position)
            self.slot_positions.append(torch.full((slots,), -1, device=device) if window else None)

    def reserve(self, num_tokens: int) -> torch.Tensor:
        """Claims the next num_tokens positions of the sequence and returns them as a (num_tokens,) tensor."""
        start = self.advance(num_tokens)
        return torch.arange(start, start + num_tokens, device=self.keys[0].device)

    def advance(self, num_tokens: int) -> int:
        """Claims the next num_tokens positions; returns the first (for callers that keep positions themselves)."""
        start = self.length
        if start + num_tokens > self.context_length:
            raise ContextLengthError(
                f"{start + num_tokens} tokens exceed the KV cache's context length of {self.context_length}"
            )
        self.length += num_tokens
        return start

    def reset(self) -> None:
        self.length = 0
        for positions in self.slot_positions:
            if positions is not None:
                positions.fill_(-1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None):
        """k, v (N, Hkv, D) at positions (N,) -> (keys (S, Hkv, D), values, mask (N, S))."""
        keys, values, slot_positions = self.keys[layer], self.values[layer], self.slot_positions[layer]
        if slot_positions is None:
            keys[positions] = k
            values[positions] = v
            end = self.length
            key_positions = torch.arange(end, device=k.device)
            return keys[:end], values[:end], attention_mask(positions, key_positions, window)
        # Ring: attend over the ring as it was plus the new chunk, then keep the chunk's last `slots` entries;
        # writing first would let a long chunk overwrite keys its own early queries still need.
        all_keys = torch.cat((keys, k))
        all_values = torch.cat((values, v))
        key_positions = torch.cat((slot_positions, positions))
        mask = attention_mask(positions, key_positions, window)
        slots = keys.shape[0]
        keep = positions[-slots:]
        keys[keep % slots] = k[-slots:]
        values[keep % slots] = v[-slots:]
        slot_positions[keep % slots] = keep
        return all_keys, all_values, mask
