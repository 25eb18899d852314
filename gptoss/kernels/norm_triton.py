"""Triton RMSNorm, alone or fused with the residual add before it.

gpt-oss's blocks are x -> x + attn(norm(x)) -> h + mlp(norm(h)). On the GPU a decode step is a chain of small
kernels, so the MLP block folds the attention's residual add into its norm: one kernel reads x and the attention
update, writes the new residual stream h and norm(h) (and, for the MoE decode kernels, norm(h) in float32).
Numerics equal the pure path's: h is rounded to the activation dtype as torch's add rounds it, then normed with
float32 statistics and gain.
"""

import torch
import triton
import triton.language as tl

from gptoss.kernels.pdl import pdl_enabled, wait_for_prior_kernel


@triton.jit
def _rms_norm_kernel(
    X, Update, W, H, Out, Out32,
    stride_x, stride_u, stride_h, stride_o, stride_o32,
    dim, eps,
    ADD: tl.constexpr,  # h = x + update is written to H and normed; else x itself is normed
    COPY_F32: tl.constexpr,  # also write the normed row in float32 to Out32
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (gptoss.kernels.pdl)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    wait_for_prior_kernel(PDL)
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if ADD:
        u = tl.load(Update + row * stride_u + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + u.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=ok)
    x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, 0) / dim + eps)
    t = (x * inv * w).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + cols, t, mask=ok)
    if COPY_F32:
        tl.store(Out32 + row * stride_o32 + cols, t.to(tl.float32), mask=ok)


def rms_norm_reference(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """gptoss.model.RMSNorm: statistics and gain in float32, output in x's dtype."""
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (t * scale).to(x.dtype)


def _launch(x, scale, eps, out, update=None, h=None, out32=None):
    """out = rms_norm(x); with update: h = x + update and out = rms_norm(h); with out32: out in float32 too."""
    dim = x.shape[-1]
    assert x.dim() == 2 and x.stride(1) == 1 and scale.shape == (dim,)
    if x.shape[0] == 0:
        return
    add, copy = update is not None, out32 is not None
    update, h, out32 = (update if add else x), (h if add else out), (out32 if copy else out)  # unused: any tensor
    block = triton.next_power_of_2(dim)
    pdl = pdl_enabled(x)
    _rms_norm_kernel[(x.shape[0],)](
        x, update, scale.contiguous(), h, out, out32,
        x.stride(0), update.stride(0), h.stride(0), out.stride(0), out32.stride(0),
        dim, eps,
        ADD=add, COPY_F32=copy, BLOCK=block, PDL=pdl, num_warps=4 if block <= 2048 else 8, launch_pdl=pdl,
    )


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x (N, H) -> (N, H) in x's dtype; fp32 statistics, fp32 gain (scale (H,))."""
    out = torch.empty_like(x)
    _launch(x, scale, eps, out)
    return out


def add_rms_norm(
    x: torch.Tensor, update: torch.Tensor, scale: torch.Tensor, eps: float, *, with_float32: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, update (N, H) -> (h = x + update, rms_norm(h), rms_norm(h) as float32 if with_float32 else None)."""
    assert update.shape == x.shape and update.stride(1) == 1
    h = torch.empty_like(x)
    out = torch.empty_like(x)
    out32 = torch.empty(x.shape, device=x.device, dtype=torch.float32) if with_float32 else None
    _launch(x, scale, eps, out, update=update, h=h, out32=out32)
    return h, out, out32
