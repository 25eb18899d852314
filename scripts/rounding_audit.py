"""Where do the fast path's bf16 numbers part from the pure path's? Every GPU kernel of a layer against its pure op,
fed the same inputs (the pure path's own intermediates), on gpt-oss-20b shapes with random weights.

Prints, per layer and op, the share of output elements whose bits differ and the relative error. An op that rounds
where the pure path does differs only where float32 summation order crosses a rounding boundary (well under 1%);
an op that rounds elsewhere differs in a large share of its elements.

    python scripts/rounding_audit.py [--layers 2] [--tokens 256]
    python scripts/rounding_audit.py --sensitivity --tokens 512 [--device cpu] [--branch-shift 3]
"""

import argparse
import os

import torch

from gptoss.bench import decisive_routers, random_model
from gptoss.config import RMS_NORM_EPS
from gptoss.kernels.attention import attention_mask, sink_attention
from gptoss.kernels.attention_triton import prefill_attention, rope_and_cache_write
from gptoss.kernels.linear_triton import gemv
from gptoss.kernels.moe import moe, route
from gptoss.kernels.moe_triton import moe_triton_from_stores
from gptoss.kernels.norm_triton import add_rms_norm, rms_norm
from gptoss.kernels.route_triton import route_triton
from gptoss.model import apply_rope


def compare(layer: int, op: str, fast: torch.Tensor, pure: torch.Tensor) -> None:
    fast, pure = fast.reshape(pure.shape), pure
    differing = (fast != pure).float().mean().item()
    error = ((fast.float() - pure.float()).norm() / pure.float().norm()).item()
    print(f"layer {layer:2d}  {op:28s} differing {differing:7.2%}  relative error {error:.2e}")


@torch.inference_mode()
def audit(layers: int, tokens: int) -> None:
    model = random_model("gpt-oss-20b", "cuda")
    config = model.config
    ids = torch.randint(0, 199998, (tokens,), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(tokens, device="cuda")
    cos, sin = model.rope(positions)
    x = model.embedding(ids)
    q_dim, kv_dim = config.q_dim, config.kv_dim
    for index, block in enumerate(model.block[:layers]):
        attn, mlp = block.attn, block.mlp
        os.environ["GPTOSS_KERNELS"] = "reference"
        t = attn.norm(x)
        qkv = attn.qkv(t)
        q = apply_rope(qkv[:, :q_dim].view(tokens, -1, config.head_dim), cos, sin)
        k = apply_rope(qkv[:, q_dim : q_dim + kv_dim].view(tokens, -1, config.head_dim), cos, sin)
        v = qkv[:, q_dim + kv_dim :].view(tokens, -1, config.head_dim)
        o = sink_attention(q, k, v, attn.sinks, attention_mask(positions, positions, attn.window), attn.sm_scale)
        update = attn.out(o.reshape(tokens, q_dim))
        h = x + update
        t2 = mlp.norm(h)
        logits = mlp.gate(t2)
        weights, experts = route(logits, config.experts_per_token)
        stores = (mlp.mlp1_weight, mlp.mlp1_bias, mlp.mlp2_weight, mlp.mlp2_bias, mlp.swiglu_limit)
        moe_out = moe(t2, weights, experts, *stores)
        out = h + moe_out
        os.environ["GPTOSS_KERNELS"] = "auto"

        compare(index, "rms_norm", rms_norm(x, attn.norm.scale, RMS_NORM_EPS), t)
        for n in (1, 4):
            compare(index, f"norm+qkv gemv N={n}", gemv(x[:n], attn.qkv.weight, attn.qkv.bias,
                                                        norm_scale=attn.norm.scale, eps=RMS_NORM_EPS), qkv[:n])
        q_fast, k_fast = rope_and_cache_write(qkv, cos, sin, config.num_attention_heads, config.num_key_value_heads)
        compare(index, "rope q", q_fast, q)
        compare(index, "rope k", k_fast, k)
        compare(index, "prefill attention", prefill_attention(q, k, v, attn.sinks, 0, attn.window, attn.sm_scale), o)
        compare(index, "out gemv N=1", gemv(o[:1].reshape(1, q_dim), attn.out.weight, attn.out.bias), update[:1])
        h_fast, t2_fast, _ = add_rms_norm(x, update, mlp.norm.scale, RMS_NORM_EPS)
        compare(index, "add_rms_norm h", h_fast, h)
        compare(index, "add_rms_norm norm", t2_fast, t2)
        compare(index, "gate gemv N=1", gemv(t2[:1], mlp.gate.weight, mlp.gate.bias), logits[:1])
        w_fast, e_fast = route_triton(logits, config.experts_per_token)
        compare(index, "route ids", e_fast.long(), experts)
        compare(index, "route weights", w_fast, weights)
        for n in (1, 4, tokens):
            fast = moe_triton_from_stores(t2[:n], weights[:n], experts[:n], *stores, residual=h[:n],
                                          x_float32=t2[:n].float() if n <= 8 else None)
            compare(index, f"moe + residual N={n}", fast, out[:n])
            compare(index, f"moe alone N={n}", moe_triton_from_stores(t2[:n], weights[:n], experts[:n], *stores),
                    moe_out[:n])
        x = out


def scaled_branches(model, shift: int):
    """Each block's residual branches (attention's output projection, the experts' mlp2, their biases) scaled by
    2^-shift, exactly (bf16 weights times a power of two, MXFP4 scale exponents lowered): the depth-scaled init of
    GPT-2, under which each layer adds a small update to a residual stream that the embedding dominates."""
    with torch.no_grad():
        for index, block in enumerate(model.block):
            scales = block.mlp.mlp2_weight.scales
            if not 0 <= shift <= int(scales.min()):  # uint8 exponents would wrap around
                raise SystemExit(f"--branch-shift {shift}: must lie in 0..{int(scales.min())} (the smallest mlp2 "
                                 f"scale exponent of block {index})")
            for tensor in (block.attn.out.weight, block.attn.out.bias, block.mlp.mlp2_bias):
                tensor.mul_(2.0**-shift)
            scales.sub_(shift)
    return model


@torch.inference_mode()
def sensitivity(tokens: int, device: str, branch_shift: int, fractions=(1e-4, 1e-3, 1e-2)) -> None:
    """How far the pure bf16 path's own logits move when a share of the first layer's inputs moves by one bf16 ulp
    (what a kernel that rounds 0.1% of its outputs differently does): the floor for any two bf16 implementations
    that are not bit-identical, next to the pure path against float32. branch_shift > 0: on weights whose residual
    branches are scaled down (scaled_branches), to see whether the floor comes from the random weights' scale."""
    os.environ["GPTOSS_KERNELS"] = "reference"

    def build(dtype):  # routers as tests/test_fast_path.py compares
        return scaled_branches(decisive_routers(random_model("gpt-oss-20b", device, dtype=dtype)), branch_shift)

    model = build(torch.bfloat16)
    ids = torch.randint(0, 199998, (tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    base = model(ids).float()
    top1 = base.argmax(-1)
    for fraction in fractions:
        chosen = torch.rand(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(device) \
            < fraction

        def one_ulp_away(module, args, out, chosen=chosen):
            return torch.where(chosen, (out.view(torch.int16) + 1).view(out.dtype), out)

        handle = model.embedding.register_forward_hook(one_ulp_away)
        moved = model(ids).float()
        handle.remove()
        error = ((moved - base).norm() / base.norm()).item()
        agree = (moved.argmax(-1) == top1).float().mean().item()
        print(f"pure bf16, {fraction:.2%} of layer-0 inputs one ulp away: logits relative error {error:.2e}, "
              f"top-1 agreement {agree:.2%}")
    del model
    exact = build(torch.float32)(ids).float()
    print(f"pure bf16 against pure float32: logits relative error {((base - exact).norm() / exact.norm()).item():.2e}, "
          f"top-1 agreement {(exact.argmax(-1) == top1).float().mean().item():.2%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sensitivity", action="store_true", help="instead: the pure path's logits under one-ulp "
                        "changes of a share of its first layer's inputs")
    parser.add_argument("--device", default="cuda", help="--sensitivity runs on the pure path: the CPU will do")
    parser.add_argument("--branch-shift", type=int, default=0, help="--sensitivity on weights whose residual "
                        "branches are scaled by 2^-SHIFT")
    args = parser.parse_args()
    if args.sensitivity:
        sensitivity(args.tokens, args.device, args.branch_shift)
    else:
        audit(args.layers, args.tokens)
