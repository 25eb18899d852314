"""Triton GEMV for the dense projections of a decode step (a few tokens), optionally with the RMSNorm before it.

At batch 1 a linear layer is a matrix-vector product bound by reading the weight once. cuBLAS picks split-K
kernels plus a separate reduce for gpt-oss's shapes (~2 TB/s, two launches); this kernel streams row tiles
once with the next tile's loads issued before the current tile's math, in one launch. With `norm_scale` it also
applies the RMSNorm that precedes the projection (attention's qkv), so that norm costs no launch: every program
recomputes the row statistics of its few input rows, which is negligible next to its share of the weight.

Numerics equal the pure path's: the normed input is rounded to the activation dtype first (as RMSNorm returns
it), products and sums are float32, the bias is added in float32 and the result rounded once.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels import triton_interpreting
from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel

# Token counts served by the GEMV (more tokens: cuBLAS, which then reads each weight once for all of them).
GEMV_MAX_TOKENS = 4


@triton.jit
def _load_w(W, rows, rmask, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(W + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _load_x(X, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, NP: tl.constexpr, n_tok, stride_x):
    ks = k0 + tl.arange(0, BLOCK_K)
    t = tl.arange(0, NP)
    return tl.load(X + t[:, None] * stride_x + ks[None, :], mask=(t < n_tok)[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(
    X, W, B, Scale, Out,
    n_tok, R, stride_x, stride_o, eps,
    K: tl.constexpr,
    NP: tl.constexpr,  # power of two >= n_tok
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,  # x is normed first: (x * rsqrt(mean(x^2) + eps) * scale) rounded to x's dtype
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (gptoss.kernels.pdl)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows = rows.to(tl.int64)
    t = tl.arange(0, NP)
    w = _load_w(W, rows, rmask, 0, K, BLOCK_K)  # weights first: they stream in under the previous kernel's tail
    if HAS_BIAS:
        bias = tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
    wait_for_prior_kernel(PDL)
    x = _load_x(X, 0, K, BLOCK_K, NP, n_tok, stride_x)
    if NORM:  # per-token 1 / rms over the whole input row, loaded at once (one latency, not one per step)
        KP: tl.constexpr = triton.next_power_of_2(K)
        cols = tl.arange(0, KP)
        xs = tl.load(X + t[:, None] * stride_x + cols[None, :], mask=(t < n_tok)[:, None] & (cols < K)[None, :],
                     other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(xs * xs, 1) / K + eps)
    acc = tl.zeros((NP, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_next = _load_w(W, rows, rmask, k0 + BLOCK_K, K, BLOCK_K)
        x_next = _load_x(X, k0 + BLOCK_K, K, BLOCK_K, NP, n_tok, stride_x)
        xf = x.to(tl.float32)
        if NORM:
            ks = k0 + tl.arange(0, BLOCK_K)
            gain = tl.load(Scale + ks, mask=ks < K, other=0.0).to(tl.float32)
            xf = (xf * inv[:, None] * gain[None, :]).to(X.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w.to(tl.float32)[None, :, :] * xf[:, None, :], 2)  # (NP, BLOCK_R)
        w, x = w_next, x_next
    if HAS_BIAS:
        acc += bias[None, :]
    tl.store(Out + t[:, None] * stride_o + rows[None, :], acc.to(Out.dtype.element_ty),
             mask=(t < n_tok)[:, None] & rmask[None, :])


def _configs():
    # The 4096-input tiles take a whole row of gpt-oss's projections in one step, loaded before the PDL wait. With
    # them among the candidates the 20b decode replay took 2.083 ms against 2.098 without (H100, same machine;
    # docs/performance.md).
    return [triton.Config({"BLOCK_R": r, "BLOCK_K": k}, num_warps=w, num_stages=1)
            for r, k, w in [(2, 512, 2), (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4),
                            (16, 256, 4), (16, 512, 8), (32, 256, 8), (1, 4096, 4), (2, 4096, 8), (4, 4096, 8)]]


# timings kept in Triton's on-disk cache: later processes skip the tuning
_gemv = triton.autotune(_configs(), key=["R", "K", "NP", "NORM"], cache_results=True)(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_scale: torch.Tensor | None = None, eps: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """x (N, K) with N <= GEMV_MAX_TOKENS, weight (R, K), bias (R,) -> (N, R) in x's dtype:
    F.linear(x, weight, bias), or F.linear(rms_norm(x, norm_scale, eps), weight, bias) with norm_scale.
    config: fixed {"BLOCK_R", "BLOCK_K", "num_warps"} instead of autotuning (always used under TRITON_INTERPRET=1,
    where there is nothing to time)."""
    n, k = x.shape
    r = weight.shape[0]
    if n > GEMV_MAX_TOKENS or weight.shape[1] != k or not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} (contiguous) with at most "
                         f"{GEMV_MAX_TOKENS} tokens")
    out = torch.empty((n, r), device=x.device, dtype=x.dtype)
    if n == 0:
        return out
    args = (x, weight, weight if bias is None else bias, weight if norm_scale is None else norm_scale, out,
            n, r, x.stride(0), out.stride(0), eps)
    pdl = pdl_enabled(x)
    meta = dict(K=k, NP=triton.next_power_of_2(n), HAS_BIAS=bias is not None, NORM=norm_scale is not None, PDL=pdl,
                launch_pdl=pdl)
    if config is None and triton_interpreting():
        config = {"BLOCK_R": 64, "BLOCK_K": 128}
    if config is None:
        _gemv[lambda m: (triton.cdiv(r, m["BLOCK_R"]),)](*args, **meta)
    else:
        _gemv_kernel[(triton.cdiv(r, config["BLOCK_R"]),)](*args, **meta, BLOCK_R=config["BLOCK_R"],
                                                           BLOCK_K=config["BLOCK_K"],
                                                           num_warps=config.get("num_warps", 4), num_stages=1)
    return out
