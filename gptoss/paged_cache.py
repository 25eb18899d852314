"""A paged KV cache for many sequences, with prefix reuse: the storage side of gptoss.engine.

Storage: per layer one key pool and one value pool of shape (num_blocks, block_size, Hkv, D). A sequence owns a
*block table* (list of block ids); token position p of the sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Sliding-window layers keep every block of the
sequence as well (simple, and lets one block table serve all layers); they only *gather* the keys that the window
can still see, so their attention cost does not grow with the context.

`BlockManager` does the bookkeeping (free lists, reference counts, prefix hashes) and never touches tensors.
`PagedKVCache` holds the pools and implements the model's cache protocol for one step that packs several sequences:
the engine calls `prepare(...)` with each sequence's block table and the positions it feeds, then
`model(tokens, positions, cache)`; each layer's `update` writes the new keys/values into their slots and returns the
gathered keys/values of all sequences in the step, with a mask that respects sequence ids, causality and the window;
`attend` (what the model calls) is `update` followed by the reference sink attention.

Prefix reuse (as in vLLM / nano-vllm): a *full* block is identified by a chained hash of its token ids and the hash
of the block before it, so equal hashes mean equal whole prefixes. Computed full blocks are registered under their
hash; a new sequence whose leading full blocks hash the same (and whose token ids match: no trust in the hash alone)
shares those blocks (reference counted) and skips computing them. A block whose reference count drops to zero keeps
its contents and hash and stays findable until it is reused for something else: unhashed free blocks are handed out
first, then hashed ones least-recently-freed first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from gptoss.config import ModelConfig
from gptoss.host_copy import to_device
from gptoss.kernels.attention import attention_mask, sink_attention


def block_hash(prev: bytes | None, tokens: Sequence[int]) -> bytes:
    """Chained hash of one full block: depends on its token ids and on every block before it."""
    h = hashlib.blake2b(digest_size=16)
    if prev is not None:
        h.update(prev)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


class BlockManager:
    """Free lists, reference counts and the prefix-hash table of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        # free blocks without a registered hash (handed out first) / with one (LRU order: evicted from the front)
        self._free_plain: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self.prefix_hit_blocks = 0  # cumulative count of blocks served from the prefix cache

    # -- counts ------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with no user (including those that still hold a reusable cached prefix)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        """Blocks currently registered under a prefix hash (in use or free)."""
        return len(self.block_of_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation --------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A fresh block (reference count 1); evicts the least recently freed cached block if need be."""
        if self._free_plain:
            block, _ = self._free_plain.popitem(last=False)
        elif self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            self._forget(block)
        else:
            raise RuntimeError("no free KV cache block")  # the scheduler checks num_free first
        self.ref_count[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more user of an existing (cached) block."""
        if self.ref_count[block] == 0:
            self._free_cached.pop(block, None)
            self._free_plain.pop(block, None)
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] < 0:
            raise RuntimeError(f"block {block} released more often than acquired")
        if self.ref_count[block] == 0:
            if self.hash_of[block] is not None:
                self._free_cached[block] = None
            else:
                self._free_plain[block] = None

    def release_all(self, blocks: Sequence[int]) -> None:
        """Frees a sequence's blocks, last first, so that its leading (most shareable) blocks are evicted last."""
        for block in reversed(blocks):
            self.release(block)

    # -- prefix cache ------------------------------------------------------------------------------------------
    def lookup(self, h: bytes, tokens: Sequence[int]) -> int | None:
        block = self.block_of_hash.get(h)
        if block is None or self.tokens_of[block] != tuple(tokens):
            return None
        return block

    def register(self, block: int, h: bytes, tokens: Sequence[int]) -> None:
        """Makes a computed full block findable by its hash (no-op if that hash already names another block)."""
        if h in self.block_of_hash or self.hash_of[block] is not None:
            return
        self.block_of_hash[h] = block
        self.hash_of[block] = h
        self.tokens_of[block] = tuple(tokens)

    def _forget(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None and self.block_of_hash.get(h) == block:
            del self.block_of_hash[h]
        self.hash_of[block] = None
        self.tokens_of[block] = None


class PagedKVCache:
    """Per-layer paged key/value pools plus the per-step metadata that the model's `update` calls read."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.bfloat16):
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.key_pools = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.value_pools = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.device = self.key_pools[0].device
        self._step: dict | None = None
        self._keys_by_window: dict = {}

    def prepare(self, entries: Sequence[tuple[Sequence[int], int, int]]) -> torch.Tensor:
        """Sets up one step. entries: per sequence (block_table, start, end): the step feeds its tokens at positions
        start..end-1 (keys/values of 0..start-1 are already in the cache). The block tables must cover `end`.
        Returns the (N,) positions of the packed tokens, in entry order. The metadata goes to the device by
        pinned copies that do not wait for work already queued (the engine may launch a step ahead)."""
        bs = self.block_size
        positions, seq_ids, slots, tables = [], [], [], []
        for i, (table, start, end) in enumerate(entries):
            if end <= start or len(table) * bs < end:
                raise ValueError(f"bad step entry: positions {start}..{end} with {len(table)} blocks")
            table_t = torch.tensor(list(table), dtype=torch.long)
            pos = torch.arange(start, end, dtype=torch.long)
            positions.append(pos)
            seq_ids.append(torch.full((end - start,), i, dtype=torch.long))
            slots.append(table_t[pos // bs] * bs + pos % bs)
            tables.append(table_t)
        positions, seq_ids, slots = to_device(torch.stack([torch.cat(positions), torch.cat(seq_ids),
                                                          torch.cat(slots)]), self.device)  # (3, N)
        self._step = {
            "entries": [(tables[i], start, end) for i, (_, start, end) in enumerate(entries)],
            "positions": positions,
            "seq_ids": seq_ids,
            "slots": slots,
        }
        self._keys_by_window = {}
        return positions

    def finish(self) -> None:
        """Drops the step's metadata."""
        self._step = None
        self._keys_by_window = {}

    def _keys_for(self, window: int | None):
        """(key slots (S,), key positions (S,), key sequence ids (S,), per-sequence (q0, q1, k0, k1) row/column
        ranges) for layers with this window: the keys of every sequence that its queries may see, in order; built
        once per step and window."""
        if window in self._keys_by_window:
            return self._keys_by_window[window]
        step, bs = self._step, self.block_size
        key_slots, key_pos, key_seq, ranges = [], [], [], []
        q0 = k0 = 0
        for i, (table, start, end) in enumerate(step["entries"]):
            first = 0 if window is None else max(0, start - window + 1)  # older keys are outside every query's window
            pos = torch.arange(first, end, dtype=torch.long)
            key_pos.append(pos)
            key_seq.append(torch.full((end - first,), i, dtype=torch.long))
            key_slots.append(table[pos // bs] * bs + pos % bs)
            ranges.append((q0, q0 + end - start, k0, k0 + end - first))
            q0, k0 = q0 + end - start, k0 + end - first
        metadata = to_device(torch.stack([torch.cat(key_slots), torch.cat(key_pos), torch.cat(key_seq)]), self.device)
        self._keys_by_window[window] = (*metadata, ranges)
        return self._keys_by_window[window]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None):
        """k, v (N, Hkv, D) of the step's tokens -> (keys (S, Hkv, D), values, mask (N, S)) over the step's
        sequences."""
        keys, values = self.gather(layer, k, v, window)
        _, key_pos, key_seq, _ = self._keys_for(window)
        return keys, values, attention_mask(self._step["positions"], key_pos, window, self._step["seq_ids"], key_seq)

    def gather(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int | None):
        """Stores k, v (N, Hkv, D) and returns the keys and values (S, Hkv, D) the step's queries may see."""
        flat_k, flat_v = self.write(layer, k, v)
        key_slots = self._keys_for(window)[0]
        return flat_k[key_slots], flat_v[key_slots]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the step's k, v (N, Hkv, D) in their slots; returns the layer's pools flattened to slots."""
        if self._step is None:
            raise RuntimeError("PagedKVCache used outside a prepared step")
        flat_k = self.key_pools[layer].view(-1, *k.shape[1:])
        flat_v = self.value_pools[layer].view(-1, *v.shape[1:])
        slots = self._step["slots"]
        flat_k[slots] = k.to(flat_k.dtype)
        flat_v[slots] = v.to(flat_v.dtype)
        return flat_k, flat_v

    def attend(self, layer, q, k, v, positions, window, sinks, sm_scale):
        """The model's cache protocol: stores k/v, then sink attention of q (N, Hq, D) over the step's keys.

        A step that prefills several sequences runs attention per sequence (the cost is then sum N_i x S_i rather
        than N x S over the packed step); a decode step (one token per sequence) runs one masked call."""
        keys, values, mask = self.update(layer, k, v, positions, window)
        ranges = self._keys_for(window)[3]
        if len(ranges) == 1 or q.shape[0] == len(ranges):
            return sink_attention(q, keys, values, sinks, mask, sm_scale)
        out = torch.empty_like(q)
        for q0, q1, k0, k1 in ranges:
            out[q0:q1] = sink_attention(q[q0:q1], keys[k0:k1], values[k0:k1], sinks, mask[q0:q1, k0:k1], sm_scale)
        return out
