"""KV caches on CUDA: the same storage as the reference caches, attention by the Triton kernels.

- TritonKVCache (one sequence, gptoss.kv_cache.KVCache's buffers): a decode step reads its position from a device
  tensor only, so a CUDA graph can capture it; a prefill chunk runs the flash-style kernel over the cached prefix
  plus the chunk.
- TritonPagedKVCache (the engine's packed steps, gptoss.paged_cache.PagedKVCache's pools): a decode step (one
  token per sequence) reads the pools through the block tables; a prefill step runs the flash kernel per sequence
  over its gathered keys.
"""

import torch

from gptoss.kernels.attention_triton import decode_attention, prefill_attention
from gptoss.kv_cache import KVCache
from gptoss.paged_cache import PagedKVCache


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


class TritonPagedKVCache(PagedKVCache):
    def attend(self, layer, q, k, v, positions, window, sinks, sm_scale):
        entries = self._step["entries"]
        if q.shape[0] == len(entries):  # decode: one new token per sequence
            self.write(layer, k, v)
            block_table, seq_lens = self._decode_metadata()
            return decode_attention(q, self.key_pools[layer], self.value_pools[layer], sinks, seq_lens, window,
                                    sm_scale, block_table=block_table)
        keys, values, _ = self.update(layer, k, v, positions, window)
        out = torch.empty_like(q)
        for (_, start, end), (q0, q1, k0, k1) in zip(entries, self._keys_for(window)[2]):
            first = end - (k1 - k0)  # position of the sequence's first gathered key
            out[q0:q1] = prefill_attention(q[q0:q1], keys[k0:k1], values[k0:k1], sinks, start, window, sm_scale,
                                           first)
        return out

    def _decode_metadata(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_blocks) int32 block tables (padded with 0) and (B,) int32 sequence lengths, once per step."""
        if "block_table" not in self._step:
            tables = [table for table, _, _ in self._step["entries"]]
            padded = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.int32)
            for i, table in enumerate(tables):
                padded[i, : len(table)] = table
            ends = torch.tensor([end for _, _, end in self._step["entries"]], dtype=torch.int32)
            self._step["block_table"] = padded.to(self.device, non_blocking=True)
            self._step["seq_lens"] = ends.to(self.device, non_blocking=True)
        return self._step["block_table"], self._step["seq_lens"]
