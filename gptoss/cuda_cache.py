"""The single-sequence KV cache on CUDA: same buffers as gptoss.kv_cache.KVCache, attention by Triton kernels.

Decode (one token) reads its position from a device tensor only, so a CUDA graph can capture it; prefill chunks
run the flash-style kernel over the cached prefix plus the chunk.
"""

import torch

from gptoss.kernels.attention_triton import decode_attention, prefill_attention
from gptoss.kv_cache import KVCache


class TritonKVCache(KVCache):
    def attend(self, layer, q, k, v, positions, window, sinks, sm_scale):
        keys, values = self.keys[layer], self.values[layer]
        slots = keys.shape[0]
        n = q.shape[0]
        if n == 1:
            slot = positions % slots
            keys.index_copy_(0, slot, k)
            values.index_copy_(0, slot, v)
            seq_lens = (positions + 1).to(torch.int32)
            return decode_attention(q, keys[None], values[None], sinks, seq_lens, window, sm_scale)
        start = self.length - n  # reserve() already counted this chunk
        if self.slot_positions[layer] is None:  # full layer: slot == position
            keys[start : start + n] = k
            values[start : start + n] = v
            return prefill_attention(q, keys[: start + n], values[: start + n], sinks, start, window, sm_scale)
        # ring: the window before the chunk, in position order, then the chunk itself
        k_start = max(0, start - slots)
        old = torch.arange(k_start, start, device=q.device) % slots
        all_keys = torch.cat((keys[old], k))
        all_values = torch.cat((values[old], v))
        keep = positions[-slots:]
        keys[keep % slots] = k[-slots:]
        values[keep % slots] = v[-slots:]
        self.slot_positions[layer][keep % slots] = keep
        return prefill_attention(q, all_keys, all_values, sinks, start, window, sm_scale, k_start)
