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
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decode_index: dict = {}

    def decode_index(self, layer: int, positions: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot of the new token in a buffer of `slots`, sequence length as int32), computed once per forward
        and buffer size rather than once per layer. Layer 0 recomputes, so a CUDA graph capture records the
        computation instead of baking in a value from before the capture."""
        if layer == 0:
            self._decode_index = {"seq_lens": (positions + 1).to(torch.int32)}
        if slots not in self._decode_index:
            self._decode_index[slots] = positions % slots
        return self._decode_index[slots], self._decode_index["seq_lens"]

    def write_target(self, layer: int, positions: torch.Tensor):
        """(keys, values, slots (N,)) where the model's RoPE kernel stores the new k and v itself (it then passes
        k = v = None to `attend`): a decode step's token, or a prefill chunk in a full layer (slot == position);
        None for a prefill chunk in a ring layer, whose early queries need the keys the chunk will replace."""
        keys, values = self.keys[layer], self.values[layer]
        if positions.shape[0] != 1:
            return (keys, values, positions) if self.slot_positions[layer] is None else None
        slot, _ = self.decode_index(layer, positions, keys.shape[0])
        return keys, values, slot

    def attend(self, layer, q, k, v, positions, window, sinks, sm_scale):
        keys, values = self.keys[layer], self.values[layer]
        slots = keys.shape[0]
        n = q.shape[0]
        if n == 1:
            if k is None:  # stored through write_target, which computed this step's index
                seq_lens = self._decode_index["seq_lens"]
            else:
                slot, seq_lens = self.decode_index(layer, positions, slots)
                keys.index_copy_(0, slot, k)
                values.index_copy_(0, slot, v)
            return decode_attention(q, keys[None], values[None], sinks, seq_lens, window, sm_scale)
        start = self.length - n  # reserve() already counted this chunk
        if self.slot_positions[layer] is None:  # full layer: slot == position
            if k is not None:  # not stored by the RoPE kernel through write_target
                keys[start : start + n] = k
                values[start : start + n] = v
            return prefill_attention(q, keys[: start + n], values[: start + n], sinks, start, window, sm_scale)
        # ring: attend over the window before the chunk (in position order) and the chunk itself, then keep the
        # chunk's last `slots` entries; writing first would let a long chunk overwrite keys its own early queries
        # still need. A first chunk has nothing before it: it attends over its own k and v, with no copies.
        k_start = max(0, start - slots)
        if start == 0:
            all_keys, all_values = k, v
        else:
            old = torch.arange(k_start, start, device=q.device) % slots
            all_keys = torch.cat((keys[old], k))
            all_values = torch.cat((values[old], v))
        self._keep_in_ring(layer, k, v, positions, start)
        return prefill_attention(q, all_keys, all_values, sinks, start, window, sm_scale, k_start)

    def _keep_in_ring(self, layer, k, v, positions, start):
        """Stores the last `slots` of a chunk at positions start.. (N,) in the layer's ring, position p at slot
        p % slots: a range that wraps at most once, so one or two slice copies a tensor."""
        keys, values, slot_positions = self.keys[layer], self.values[layer], self.slot_positions[layer]
        slots, n = keys.shape[0], k.shape[0]
        kept = min(n, slots)
        first = (start + n - kept) % slots  # ring slot of the first kept token
        before_end = min(kept, slots - first)  # kept tokens that fit before the ring's end; the rest wrap to 0
        for lo, hi, at in ((n - kept, n - kept + before_end, first), (n - kept + before_end, n, 0)):
            if hi > lo:
                keys[at : at + hi - lo] = k[lo:hi]
                values[at : at + hi - lo] = v[lo:hi]
                slot_positions[at : at + hi - lo] = positions[lo:hi]


class TritonPagedKVCache(PagedKVCache):
    """One block beyond `num_blocks` is scratch space: padding rows of a graphed decode batch write there."""

    def __init__(self, config, num_blocks: int, block_size: int, device=None, dtype=torch.bfloat16):
        super().__init__(config, num_blocks + 1, block_size, device=device, dtype=dtype)
        self.scratch_slot = num_blocks * block_size
        self.decode_step: DecodeStepView | None = None  # set while GraphedBatchDecode records its steps

    def write_target(self, layer: int, positions: torch.Tensor):
        """In a graphed decode step: (key pool, value pool, slots (B,)) where the model's RoPE kernel stores the new
        k and v itself (it then passes k = v = None to `attend`); None otherwise."""
        if self.decode_step is None:
            return None
        return self.key_pools[layer], self.value_pools[layer], self.decode_step.slots

    def attend(self, layer, q, k, v, positions, window, sinks, sm_scale):
        if self.decode_step is not None:  # decode: one new token per sequence, static metadata
            step = self.decode_step
            if k is not None:
                n_kv, head_dim = k.shape[1:]
                self.key_pools[layer].view(-1, n_kv, head_dim).index_copy_(0, step.slots, k)
                self.value_pools[layer].view(-1, n_kv, head_dim).index_copy_(0, step.slots, v)
            return decode_attention(q, self.key_pools[layer], self.value_pools[layer], sinks, step.seq_lens, window,
                                    sm_scale, block_table=step.block_table, max_context=step.max_context)
        keys, values = self.gather(layer, k, v, window)  # the Triton kernels mask by positions themselves
        out = torch.empty_like(q)
        for (_, start, end), (q0, q1, k0, k1) in zip(self._step["entries"], self._keys_for(window)[3]):
            first = end - (k1 - k0)  # position of the sequence's first gathered key
            out[q0:q1] = prefill_attention(q[q0:q1], keys[k0:k1], values[k0:k1], sinks, start, window, sm_scale,
                                           first)
        return out


class DecodeStep:
    """Static device metadata of a decode step for up to `max_batch` sequences, refilled before each replay:
    positions and slots (B,) int64, sequence lengths (B,) int32, block tables (B, max_blocks) int32.
    Padding rows (up to the captured batch size) write to the scratch slot and read nothing (length 0).

    The host side is staged in two pinned buffers used in turn, each reused only once its copies have run: the
    engine fills step t+2's metadata while step t+1's copies may still wait on the stream (launch_ahead)."""

    def __init__(self, cache: TritonPagedKVCache, max_batch: int, max_context: int):
        self.cache = cache
        self.max_context = max_context
        max_blocks = -(-max_context // cache.block_size)
        shapes = {"positions": ((max_batch,), torch.int64), "slots": ((max_batch,), torch.int64),
                  "seq_lens": ((max_batch,), torch.int32), "block_table": ((max_batch, max_blocks), torch.int32)}
        pinned = cache.device.type == "cuda"
        self.staging = [{name: torch.zeros(shape, dtype=dtype, pin_memory=pinned) for name, (shape, dtype) in
                         shapes.items()} for _ in range(2)]
        self.copied = [None, None]  # per staging buffer: CUDA event after its last copies (None: free)
        self.turn = 0
        self.device = {name: torch.zeros(shape, dtype=dtype, device=cache.device)
                       for name, (shape, dtype) in shapes.items()}

    def view(self, batch: int) -> "DecodeStepView":
        return DecodeStepView(**{name: t[:batch] for name, t in self.device.items()}, max_context=self.max_context)

    def fill(self, entries, batch: int) -> None:
        """entries [(block_table, start, end)] with end == start + 1, padded to `batch` rows. Built with a few
        tensor ops rather than per-entry ones: this runs on the host before every decode step of the engine.
        Block-table columns past a row's last block keep stale values: the kernels read only a row's first
        ceil(seq_len / block_size) entries."""
        bs = self.cache.block_size
        n = len(entries)
        width = max(len(table) for table, _, _ in entries)
        tables = torch.tensor([list(table) + [0] * (width - len(table)) for table, _, _ in entries], dtype=torch.int32)
        starts = torch.tensor([start for _, start, _ in entries], dtype=torch.int64)
        self.turn ^= 1
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()  # normally long done: it is two steps old
        host = {name: t[:batch] for name, t in self.staging[self.turn].items()}
        host["positions"][:n] = starts
        host["slots"][:n] = tables[torch.arange(n), starts // bs] * bs + starts % bs
        host["seq_lens"][:n] = (starts + 1).to(torch.int32)
        host["block_table"][:n, :width] = tables
        host["positions"][n:] = 0
        host["slots"][n:] = self.cache.scratch_slot
        host["seq_lens"][n:] = 0
        for name, t in host.items():
            self.device[name][:batch].copy_(t, non_blocking=True)
        if self.cache.device.type == "cuda":
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record()


class DecodeStepView:
    def __init__(self, positions, slots, seq_lens, block_table, max_context):
        self.positions, self.slots, self.seq_lens, self.block_table = positions, slots, seq_lens, block_table
        self.max_context = max_context
