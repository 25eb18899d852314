"""Triton attention kernels with sinks, GQA and an optional sliding window.

Same semantics as the pure reference in gptoss.kernels.attention (attention_mask + sink_attention):
scores s = q·k * sm_scale in fp32; one sink logit per query head joins the softmax denominator,
p_j = exp(s_j - m) / (exp(sink - m) + sum_i exp(s_i - m)); causal; optional sliding window W (query at position
q sees keys q-W+1 .. q); query head h reads KV head h // (Hq // Hkv).

Rounding as the reference where it costs nothing: its scores, probabilities and P.V products are float32; the
decode kernel keeps P to ~16 bits (two 16-bit MMAs, see _pv_dot) and rounds only the output, the prefill kernel
rounds P to bf16 for its P.V MMA. RoPE rounds where apply_rope's torch ops round.

- prefill_attention: flash attention (online softmax, fp32 accumulators, bf16 tensor-core dots) for ONE sequence
  whose queries sit at positions q_start .. q_start+N-1 and whose keys sit at k_start .. k_start+S-1. The G query
  heads sharing one KV head are packed into the rows of one tile, so each K/V tile is loaded once for all of them.
  Key blocks outside the causal/window range are skipped (a sliding layer costs O(N*W)), and blocks that every row
  of a tile sees fully run without the mask.
- decode_attention: one new query per sequence (flash-decoding): the visible key range is split across programs,
  each program handles all G query heads of one KV head, and a small combine kernel merges the partial softmaxes
  and folds in the sink. The grid is static (no host sync; CUDA-graph capturable). Contiguous caches (slot =
  position % S_max, so a ring of S_max == W slots works for sliding layers) and paged caches (block_table) are
  supported.

Uses only portable Triton (tl.dot, no sm_90-only instructions; the decode kernels use programmatic dependent launch
where the GPU has it, see gptoss.kernels.pdl). Runs under TRITON_INTERPRET=1 on CPU tensors.
"""

import math

import torch
import triton
import triton.language as tl

from gptoss.kernels import triton_interpreting
from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel
from gptoss.kernels.rounding import round_to

LOG2E = 1.4426950408889634


@triton.jit
def _pv_dot(p, v, acc, F32: tl.constexpr, SPLIT_P: tl.constexpr):
    """acc + p @ v for float32 probabilities p (BLOCK, BLOCK_N) and 16-bit values v. The pure path multiplies
    float32 probabilities; rounding p to bf16 for one MMA moves the outputs by up to half a bf16 ulp. SPLIT_P
    (decode, where the MMA is free next to the cache reads) keeps ~16 bits of p instead: a 16-bit head and the
    16-bit rounding of its remainder, two MMAs. Prefill rounds p (flash-attention practice): the split cost 14% of
    the 1k-token prefill on the H100."""
    if F32 or v.dtype == tl.float32:  # float32 models: one exact float32 dot (not tf32)
        return tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    elif SPLIT_P:
        head = p.to(v.dtype)
        rest = (p - head.to(tl.float32)).to(v.dtype)
        return tl.dot(rest, v, tl.dot(head, v, acc))
    else:
        return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    # F32: the CPU interpreter (TRITON_INTERPRET=1) mis-multiplies bf16 operands, so it gets float32 operands
    # (same values: bf16 -> fp32 is exact); on the GPU the operands stay 16-bit for the tensor cores.
    # "ieee": float32 operands (a float32 model) multiply exactly rather than rounded to TF32.
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


# --------------------------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _prefill_block(
    acc, m_i, l_i, q, q_pos, K, V, start, S, k_start, window, kvh,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    F32: tl.constexpr,
):
    cols = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + cols[None, :] * stride_kn + kvh * stride_kh + d[:, None]  # (D, BLOCK_N)
    v_ptrs = V + cols[:, None] * stride_vn + kvh * stride_vh + d[None, :]  # (BLOCK_N, D)
    if MASKED:
        col_ok = cols < S
        k = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = _dot(q, k, None, F32) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
    if MASKED:
        k_pos = k_start + cols
        vis = (k_pos[None, :] <= q_pos[:, None]) & col_ok[None, :]
        if HAS_WINDOW:
            vis = vis & ((q_pos[:, None] - k_pos[None, :]) < window)
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: m_i starts at the (finite) sink logit
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = _pv_dot(p, v, acc, F32, False)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    Q, K, V, Sinks, Out,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    N, S, q_start, k_start, window, qk_scale,
    G: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    F32: tl.constexpr,
):
    # rows of the tile = (token, head-in-group) pairs, flattened token-major: row r -> token r // G, head r % G
    pid_m = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // G
    head = kvh * G + rows % G
    row_ok = tok < N
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = q_start + tok

    # the sink is the initial state of the online softmax: m = sink, l = exp(sink - m) = 1, acc = 0
    m_i = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    tok_lo = (pid_m * BLOCK_M) // G
    tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, N - 1)
    # key indices (key i sits at position k_start + i) any row may see: [lo, hi)
    hi = tl.minimum(S, q_start + tok_hi + 1 - k_start)
    if HAS_WINDOW:
        lo = tl.maximum(0, q_start + tok_lo - window + 1 - k_start)
        # first key index every row sees (window edge of the last row)
        full_lo = tl.maximum(0, q_start + tok_hi - window + 1 - k_start)
    else:
        lo = q_start * 0
        full_lo = q_start * 0
    lo = (lo // BLOCK_N) * BLOCK_N
    # unmasked blocks: [mid_lo, mid_hi) with every column visible to every row and inside S
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.minimum(q_start + tok_lo + 1 - k_start, S)  # last row-independent causal edge (exclusive)
    mid_hi = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, mid_lo), hi)

    for start in range(lo, mid_lo, BLOCK_N):
        acc, m_i, l_i = _prefill_block(
            acc, m_i, l_i, q, q_pos, K, V, start, S, k_start, window, kvh,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
            True, HAS_WINDOW, BLOCK_N, HEAD_DIM, F32,
        )
    for start in range(mid_lo, mid_hi, BLOCK_N):
        acc, m_i, l_i = _prefill_block(
            acc, m_i, l_i, q, q_pos, K, V, start, S, k_start, window, kvh,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
            False, HAS_WINDOW, BLOCK_N, HEAD_DIM, F32,
        )
    for start in range(mid_hi, hi, BLOCK_N):
        acc, m_i, l_i = _prefill_block(
            acc, m_i, l_i, q, q_pos, K, V, start, S, k_start, window, kvh,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
            True, HAS_WINDOW, BLOCK_N, HEAD_DIM, F32,
        )

    out = acc / l_i[:, None]
    tl.store(
        Out + tok[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
        round_to(out, Out.dtype.element_ty).to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )


_PREFILL_WINDOW_CFG = (64, 32, 4, 2)  # block_m (rows = tokens x heads of a group), block_n, num_warps, num_stages
_PREFILL_FULL_CFG = (128, 64, 8, 3)


def _check_heads(q: torch.Tensor, n_kv_heads: int, sinks: torch.Tensor, window: int | None,
                 sm_scale: float | None) -> tuple[int, float]:
    """Checks shared by both kernels; returns (query heads per KV head, softmax scale)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    assert sinks.shape == (n_heads,) and n_heads % n_kv_heads == 0 and q.stride(2) == 1
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    return n_heads // n_kv_heads, sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    q_start: int = 0,
    window: int | None = None,
    sm_scale: float | None = None,
    k_start: int = 0,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention for one sequence: q (N, Hq, D) at positions q_start..q_start+N-1 over k, v (S, Hkv, D) at positions
    k_start..k_start+S-1; sinks (Hq,) -> (N, Hq, D) in q's dtype. Causal, optional sliding window.

    For a plain prefill q_start = k_start = 0 and S = N; for a continued prefill over a contiguous cache
    q_start > 0, k_start = 0 and S = q_start + N. Inner dims (D) must be contiguous; other strides are free.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_keys, n_kv_heads, _ = k.shape
    assert v.shape == k.shape and k.shape[2] == head_dim and k_start >= 0 and q_start >= 0
    assert k.stride(2) == 1 and v.stride(2) == 1
    g, sm_scale = _check_heads(q, n_kv_heads, sinks, window, sm_scale)
    # tiles measured on an H100 (scripts/bench_attention.py --sweep): small tiles for sliding layers (few keys
    # per row), large ones for full layers
    cfg = _PREFILL_WINDOW_CFG if window is not None else _PREFILL_FULL_CFG
    block_m = block_m or cfg[0]
    block_n = block_n or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    if out is None:
        out = torch.empty((n_tokens, n_heads, head_dim), device=q.device, dtype=q.dtype)
    if n_tokens == 0:
        return out
    assert out.stride(2) == 1
    sinks = sinks.contiguous()
    grid = (triton.cdiv(n_tokens * g, block_m), n_kv_heads)
    _prefill_kernel[grid](
        q, k, v, sinks, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        n_tokens, n_keys, q_start, k_start, window if window is not None else 0, sm_scale * LOG2E,
        G=g, HAS_WINDOW=window is not None, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        F32=triton_interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------------------------------
# Decode (flash-decoding: split-K + combine)
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    Q, K, V, Sinks, SeqLens, BlockTable, Out, Mpart, Lpart, Apart,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ob, stride_oh,
    n_heads, n_slots, block_size, window, qk_scale, num_splits,
    G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGED: tl.constexpr, HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    wait_for_prior_kernel(PDL)
    seq_len = tl.load(SeqLens + b).to(tl.int32)  # tokens in the cache including the new query's own
    hi = seq_len
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    else:
        lo = seq_len * 0
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    s_lo = lo + split * chunk
    s_hi = tl.minimum(hi, s_lo + chunk)

    h = tl.arange(0, BLOCK_H)
    h_ok = h < G
    head = kvh * G + h
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=h_ok[:, None], other=0.0)

    if DIRECT:  # one split: the sink is the initial state
        m_i = tl.load(Sinks + head, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_H], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)

    if PAGED:
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
    else:
        k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh

    for start in range(s_lo, s_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < s_hi
        if PAGED:
            page = tl.load(BlockTable + b * stride_bt + pos // block_size, mask=ok, other=0).to(tl.int64)
            k_off = page * stride_kb + (pos % block_size) * stride_ks
            v_off = page * stride_vb + (pos % block_size) * stride_vs
        else:
            slot = pos % n_slots
            k_off = slot * stride_ks
            v_off = slot * stride_vs
        k = tl.load(k_base + k_off[None, :] + d[:, None], mask=ok[None, :], other=0.0)  # (D, BLOCK_N)
        qk = _dot(q, k, None, F32) * qk_scale
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block has at least one valid column
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_off[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # (BLOCK_N, D)
        acc = _pv_dot(p, v, acc * alpha[:, None], F32, True)
        m_i = m_new

    if DIRECT:
        out = acc / l_i[:, None]
        tl.store(
            Out + b * stride_ob + head[:, None] * stride_oh + d[None, :],
            round_to(out, Out.dtype.element_ty).to(Out.dtype.element_ty),
            mask=h_ok[:, None],
        )
    else:
        # partials: (B, Hq, num_splits) for m, l and (B, Hq, num_splits, D) for acc; contiguous
        part = (b * n_heads + head) * num_splits + split
        tl.store(Mpart + part, m_i, mask=h_ok)
        tl.store(Lpart + part, l_i, mask=h_ok)
        tl.store(Apart + part[:, None] * HEAD_DIM + d[None, :], acc, mask=h_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    Sinks, Out, Mpart, Lpart, Apart, stride_ob, stride_oh, n_heads, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    wait_for_prior_kernel(PDL)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    part = (b * n_heads + head) * num_splits + s
    m = tl.load(Mpart + part, mask=s_ok, other=float("-inf"))
    l = tl.load(Lpart + part, mask=s_ok, other=0.0)
    a = tl.load(Apart + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    sink = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m, 0), sink)
    w = tl.math.exp2(m - m_all)  # 0 for empty splits (m = -inf)
    denom = tl.sum(l * w, 0) + tl.math.exp2(sink - m_all)
    out = tl.sum(a * w[:, None], 0) / denom
    tl.store(Out + b * stride_ob + head * stride_oh + d, round_to(out, Out.dtype.element_ty).to(Out.dtype.element_ty))


_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def decode_num_splits(batch: int, n_kv_heads: int, max_context: int, device: torch.device, min_keys: int = 128) -> int:
    """Splits of the key range per (sequence, KV head): enough programs to fill the GPU about twice, at least
    min_keys keys each; a power of two (few compiled variants). Depends only on Python ints: graph-safe.
    (Capping the keys a split at 256 made a 64-sequence engine step's attention slower on H100: 36 -> 40 us a
    layer, plus 9 us of combining in the full layers.)"""
    want = triton.cdiv(2 * _num_sms(device), max(1, batch * n_kv_heads))
    by_len = triton.cdiv(max(1, max_context), min_keys)
    n = max(1, min(want, by_len))
    return triton.next_power_of_2(n)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None = None,
    sm_scale: float | None = None,
    block_table: torch.Tensor | None = None,
    max_context: int | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """One new query per sequence: q (B, Hq, D) at position seq_lens[b] - 1 -> (B, Hq, D) in q's dtype.

    seq_lens (B,) int32 on q's device: tokens in the cache including the new one (already written there).
    Contiguous cache: k_cache/v_cache (B, S_max, Hkv, D), slot = position % S_max (slot = position for full layers;
    a ring of S_max >= W slots for sliding layers). Paged cache: k_cache/v_cache (num_blocks, block_size, Hkv, D)
    with block_table (B, max_blocks) int32; slot of position p = block_table[b, p // block_size] * block_size +
    p % block_size. With a window W only positions max(0, L-W)..L-1 are read.
    max_context (Python int) bounds seq_lens and sets the split count; by default it comes from the cache shape.
    No host sync: capturable in a CUDA graph. A sequence with seq_lens[b] == 0 (batch padding) gets zeros.
    """
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim and seq_lens.shape == (batch,)
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    g, sm_scale = _check_heads(q, n_kv_heads, sinks, window, sm_scale)
    paged = block_table is not None
    if paged:
        assert block_table.dim() == 2 and block_table.shape[0] == batch
        block_size = k_cache.shape[1]
        n_slots = 1
        cap = block_table.shape[1] * block_size
        stride_bt = block_table.stride(0)
        assert block_table.stride(1) == 1
    else:
        assert k_cache.shape[0] == batch
        block_size = 1
        n_slots = k_cache.shape[1]
        cap = n_slots
        stride_bt = 0
    if max_context is None:
        max_context = cap
    if window is not None:
        max_context = min(max_context, window)
    if num_splits is None:
        num_splits = decode_num_splits(batch, n_kv_heads, max_context, q.device)
    if out is None:
        out = torch.empty((batch, n_heads, head_dim), device=q.device, dtype=q.dtype)
    if batch == 0:
        return out
    assert out.stride(2) == 1
    sinks = sinks.contiguous()
    direct = num_splits == 1
    if direct:
        m_part = l_part = a_part = out  # unused
    else:
        m_part = torch.empty((batch, n_heads, num_splits), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        a_part = torch.empty((batch, n_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
    bt = block_table if paged else seq_lens  # dummy pointer when not paged
    grid = (batch, n_kv_heads, num_splits)
    pdl = pdl_enabled(q)
    _decode_kernel[grid](
        q, k_cache, v_cache, sinks, seq_lens, bt, out, m_part, l_part, a_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_bt, out.stride(0), out.stride(1),
        n_heads, n_slots, block_size, window if window is not None else 0, sm_scale * LOG2E, num_splits,
        G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n, HEAD_DIM=head_dim,
        PAGED=paged, HAS_WINDOW=window is not None, DIRECT=direct, F32=triton_interpreting(), PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    if not direct:
        _decode_combine_kernel[(batch, n_heads)](
            sinks, out, m_part, l_part, a_part, out.stride(0), out.stride(1), n_heads, num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, PDL=pdl, launch_pdl=pdl,
        )
    return out


# --------------------------------------------------------------------------------------------------------------------
# Fused RoPE (half-split) on q and k + KV-cache write
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_rows(X, Out, row_x, row_o, c, s, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # X/Out rows: n_heads heads of 2*HALF elements, contiguous; c, s (HALF,) in the activation dtype, as fp32
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF)
    ok = (h < n_heads)[:, None]
    off = h[:, None] * (2 * HALF) + i[None, :]
    x1 = tl.load(X + row_x + off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + row_x + off + HALF, mask=ok, other=0.0).to(tl.float32)
    # each product and the sum rounded to the activation dtype, as apply_rope's torch ops round them (float32
    # models: the compiler may fuse a product into the sum, a float32 ulp away)
    DT: tl.constexpr = X.dtype.element_ty
    o1 = round_to(round_to(x1 * c[None, :], DT) - round_to(x2 * s[None, :], DT), DT)
    o2 = round_to(round_to(x2 * c[None, :], DT) + round_to(x1 * s[None, :], DT), DT)
    tl.store(Out + row_o + off, o1.to(Out.dtype.element_ty), mask=ok)
    tl.store(Out + row_o + off + HALF, o2.to(Out.dtype.element_ty), mask=ok)
    return o1, o2


@triton.jit
def _rope_cache_kernel(
    QKV, Cos, Sin, Qout, Kout, Kc, Vc, Slots,
    stride_qkv, stride_cos, stride_sin, stride_qo, stride_ko, stride_kc, stride_vc,
    n_heads, n_kv_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, WRITE: tl.constexpr, PDL: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    wait_for_prior_kernel(PDL)
    i = tl.arange(0, HALF)
    # tables in fp32, applied in the activation dtype (as gptoss.model.apply_rope casts them)
    c = round_to(tl.load(Cos + n * stride_cos + i), QKV.dtype.element_ty)
    s = round_to(tl.load(Sin + n * stride_sin + i), QKV.dtype.element_ty)
    q_dim = n_heads * 2 * HALF
    kv_dim = n_kv_heads * 2 * HALF
    row = n * stride_qkv
    _rope_rows(QKV, Qout, row, n * stride_qo, c, s, n_heads, HALF, BLOCK_HQ)
    k1, k2 = _rope_rows(QKV, Kout, row + q_dim, n * stride_ko, c, s, n_kv_heads, HALF, BLOCK_HK)
    if WRITE:
        slot = tl.load(Slots + n).to(tl.int64)
        if slot >= 0:
            h = tl.arange(0, BLOCK_HK)
            ok = (h < n_kv_heads)[:, None]
            off = h[:, None] * (2 * HALF) + i[None, :]
            tl.store(Kc + slot * stride_kc + off, k1.to(Kc.dtype.element_ty), mask=ok)
            tl.store(Kc + slot * stride_kc + off + HALF, k2.to(Kc.dtype.element_ty), mask=ok)
            v1 = tl.load(QKV + row + q_dim + kv_dim + off, mask=ok, other=0.0)
            v2 = tl.load(QKV + row + q_dim + kv_dim + off + HALF, mask=ok, other=0.0)
            tl.store(Vc + slot * stride_vc + off, v1.to(Vc.dtype.element_ty), mask=ok)
            tl.store(Vc + slot * stride_vc + off + HALF, v2.to(Vc.dtype.element_ty), mask=ok)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """gptoss.model.apply_rope: x (N, heads, D), cos/sin (N, D/2) fp32; half-split pairs (i, i + D/2)."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_and_cache_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (N, Hq*D + 2*Hkv*D) rows q | k | v; cos/sin (N, D/2) fp32 -> (q (N, Hq, D), k (N, Hkv, D)) with RoPE.

    With caches (any shape whose leading dims flatten to slots: (B, S_max, Hkv, D) or (num_blocks, block_size,
    Hkv, D), contiguous in the last two dims) and slots (N,) int: writes the rotated k and the plain v of token n to
    flat slot slots[n] (b * S_max + position % S_max, or block * block_size + offset); slots[n] < 0 skips token n.
    """
    n_tokens = qkv.shape[0]
    half = cos.shape[1]
    head_dim = 2 * half
    assert qkv.shape[1] == (n_heads + 2 * n_kv_heads) * head_dim and qkv.stride(1) == 1
    assert cos.stride(1) == 1 and sin.stride(1) == 1 and half & (half - 1) == 0
    q = torch.empty((n_tokens, n_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    k = torch.empty((n_tokens, n_kv_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    write = slots is not None
    if write:
        kc = k_cache.view(-1, n_kv_heads, head_dim)
        vc = v_cache.view(-1, n_kv_heads, head_dim)
        assert slots.shape == (n_tokens,)
    else:
        kc, vc, slots = k, k, cos  # unused
    if n_tokens == 0:
        return q, k
    pdl = pdl_enabled(qkv)
    _rope_cache_kernel[(n_tokens,)](
        qkv, cos, sin, q, k, kc, vc, slots,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), k.stride(0), kc.stride(0), vc.stride(0),
        n_heads, n_kv_heads,
        HALF=half, BLOCK_HQ=triton.next_power_of_2(n_heads), BLOCK_HK=triton.next_power_of_2(n_kv_heads), WRITE=write,
        PDL=pdl, launch_pdl=pdl,
    )
    return q, k
