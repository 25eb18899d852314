"""Around the MoE GEMMs: the (token, expert) pairs grouped by expert before them, and the routing-weighted sum of
the experts' outputs after them (and after the GEMVs). Neither synchronizes with the host.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel

# Pairs one program groups alone: a (pairs, experts) one-hot of at most GROUP_ONEHOT int32 in registers (1,024
# pairs of 32 experts; a 64-token batched decode step has 256). torch.sort's grouping took ~28 us of small kernels a
# layer on an H100 at 64 tokens (radix sort, scatter_add, two cumsum scans, casts), against 2.8 us for one program.
# More pairs take one more launch, which counts each chunk's pairs first, in chunks of GROUP_CHUNK_ONEHOT one-hot
# entries (128 pairs of 32 experts): small chunks keep each program's one-hot in registers and give the launch more
# programs. A 1k prefill's 4,096 pairs (H100, scripts/profile_prefill.py): 5.2 us in 32 chunks against 12.9 in 4
# chunks of 1,024 (chunks of 64 and 32 pairs: 4.4 and 4.2 us); torch.sort's grouping took ~25 us and copies.
GROUP_ONEHOT = 32768
GROUP_CHUNK_ONEHOT = 4096


@triton.jit
def _count_chunk_kernel(ids_ptr, counts_ptr, M, CHUNK: tl.constexpr, EP: tl.constexpr):
    """Program c: counts (EP,) of each expert among pairs c * CHUNK .. (c + 1) * CHUNK - 1 -> counts row c."""
    i = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ex = tl.arange(0, EP)
    e = tl.load(ids_ptr + i, mask=i < M, other=EP)  # padding matches no expert
    tl.store(counts_ptr + tl.program_id(0) * EP + ex, tl.sum((e[:, None] == ex[None, :]).to(tl.int32), 0))


@triton.jit
def _group_pairs_kernel(ids_ptr, counts_ptr, order_ptr, seg_ptr, M, E, C, CHUNK: tl.constexpr, EP: tl.constexpr,
                        CB: tl.constexpr):
    """Program c places pairs c * CHUNK .. as a stable sort by expert orders them: order (M,) sorted row ->
    pair, and program 0 writes seg (E,), the end sorted row of each expert. Pair i goes to its expert's start
    + the pairs of that expert in earlier chunks (counts (C, EP), from `_count_chunk_kernel`; C == 1: none,
    counted here) + those before it in its own chunk (a (CHUNK, EP) one-hot in registers)."""
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    ex = tl.arange(0, EP)
    e = tl.load(ids_ptr + i, mask=i < M, other=EP)  # padding matches no expert
    onehot = (e[:, None] == ex[None, :]).to(tl.int32)  # (CHUNK, EP)
    if C == 1:
        totals = tl.sum(onehot, 0)
        before = tl.zeros((EP,), tl.int32)
    else:
        totals = tl.zeros((EP,), tl.int32)
        before = tl.zeros((EP,), tl.int32)
        for c0 in range(0, C, CB):  # the chunk counts, CB rows at a time
            cs = c0 + tl.arange(0, CB)
            n = tl.load(counts_ptr + cs[:, None] * EP + ex[None, :], mask=(cs < C)[:, None], other=0)
            totals += tl.sum(n, 0)
            before += tl.sum(tl.where((cs < c)[:, None], n, 0), 0)
    ends = tl.cumsum(totals, 0)
    earlier = tl.cumsum(onehot, 0) - onehot  # (CHUNK, EP) pairs of each expert before pair i in the chunk
    row = tl.sum(onehot * (ends - totals + before + earlier), 1)  # (CHUNK,) pair i's sorted row
    tl.store(order_ptr + row, i, mask=i < M)
    if c == 0:
        tl.store(seg_ptr + ex, ends, mask=ex < E)


def group_pairs(flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat_ids (M,) expert of each (token, expert) pair -> (order (M,) int32 sorted row -> pair, seg_end (E,)
    int32 end sorted row of each expert): the pairs grouped by expert, in pair order within an expert (a stable
    sort). No host synchronization."""
    m = flat_ids.numel()
    ep = triton.next_power_of_2(num_experts)
    one_launch = triton.next_power_of_2(m) * ep <= GROUP_ONEHOT
    chunk = max(16, triton.next_power_of_2(m) if one_launch else GROUP_CHUNK_ONEHOT // ep)
    chunks = triton.cdiv(m, chunk)
    ids = flat_ids.contiguous()
    order = torch.empty(m, dtype=torch.int32, device=ids.device)
    seg_end = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    warps = 4 if chunk * ep <= 8192 else 8
    counts = order  # not read with one chunk
    if chunks > 1:
        counts = torch.empty((chunks, ep), dtype=torch.int32, device=ids.device)
        _count_chunk_kernel[(chunks,)](ids, counts, m, CHUNK=chunk, EP=ep, num_warps=warps)
    count_rows = max(1, min(triton.next_power_of_2(chunks), 4096 // ep))  # counts' rows the second kernel loads a step
    _group_pairs_kernel[(chunks,)](ids, counts, order, seg_end, m, num_experts, chunks, CHUNK=chunk, EP=ep,
                                   CB=count_rows, num_warps=warps)
    return order, seg_end


@triton.jit
def _combine_kernel(y_ptr, rw_ptr, res_ptr, rows_ptr, out_ptr, H: tl.constexpr, K_ROUTE: tl.constexpr,
                    RESIDUAL: tl.constexpr, ROWS: tl.constexpr, SHARD: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    """out[n] = sum_k w(n, k) * y[row of pair], pair = n * K + k (the row: rows[pair] with ROWS, else the
    pair), summed in float32 in a fixed order and cast to out's dtype (one launch instead of torch's sum +
    cast; no atomics, so deterministic). RESIDUAL:
    out[n] = res[n] + that sum, rounded as the pure path rounds (the sum to out's dtype first, then the add).
    SHARD: pairs of weight 0 (an expert shard's other ranks' pairs, whose y was never written) are not read."""
    n = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    hm = hs < H
    wait_for_prior_kernel(PDL)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(K_ROUTE):
        p = n * K_ROUTE + k
        row = tl.load(rows_ptr + p).to(tl.int64) if ROWS else p
        w = tl.load(rw_ptr + p).to(tl.float32)
        read = tl.where(w != 0, hm, False) if SHARD else hm
        acc += w * tl.load(y_ptr + row * H + hs, mask=read, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        out = (tl.load(res_ptr + n * H + hs, mask=hm, other=0.0).to(tl.float32) + out.to(tl.float32)).to(
            out_ptr.dtype.element_ty)
    tl.store(out_ptr + n * H + hs, out, mask=hm)


def combine(y: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None, dtype,
            rows: torch.Tensor | None = None, shard: bool = False) -> torch.Tensor:
    """y (N * K, H) expert outputs by pair (or where rows (N * K,) int32 says each pair's is), weights (N, K) ->
    (N, H): the routing-weighted sum (+ residual). shard: pairs of weight 0 are not read (see _combine_kernel)."""
    n, k = weights.shape
    h = y.shape[1]
    out = torch.empty((n, h), device=y.device, dtype=dtype)
    block = 1024
    res = out if residual is None else residual.contiguous()
    pdl = pdl_enabled(y)
    _combine_kernel[(n, triton.cdiv(h, block))](y, weights.reshape(-1).contiguous(), res,
                                                y if rows is None else rows, out, H=h, K_ROUTE=k,
                                                RESIDUAL=residual is not None, ROWS=rows is not None, SHARD=shard,
                                                BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
