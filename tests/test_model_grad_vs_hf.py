"""The pure path is the one fine-tuning differentiates: its gradients against Hugging Face transformers'
GptOssForCausalLM (autograd through an independent implementation) on the same weights, in float32.

Covers what training through gpt-oss needs beyond a plain transformer: the sinks' gradient (an extra softmax
column), the sliding window, the router (softmax over the top-4 logits), the clamped SwiGLU and the experts'
weights and biases (dense experts, as `dequantize=True` loads them for fine-tuning)."""

import pytest
import torch

from conftest import SMALL, relative_error
from gptoss.checkpoint_writer import write_checkpoint
from gptoss.model import Transformer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_names_and_view(name: str):
    """Our parameter name -> (the transformers parameters whose concatenation holds its values, how to read ours
    as that)."""
    fixed = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
             "unembedding.weight": "lm_head.weight"}
    if name in fixed:
        return [fixed[name]], lambda t: t
    _, layer, rest = name.split(".", 2)
    pre = f"model.layers.{layer}."
    per_layer = {
        "attn.sinks": ("self_attn.sinks", lambda t: t),
        "attn.norm.scale": ("input_layernorm.weight", lambda t: t),
        "attn.out.weight": ("self_attn.o_proj.weight", lambda t: t),
        "attn.out.bias": ("self_attn.o_proj.bias", lambda t: t),
        "attn.qkv.weight": ("self_attn.{}_proj.weight", lambda t: t),  # rows q | k | v
        "attn.qkv.bias": ("self_attn.{}_proj.bias", lambda t: t),
        "mlp.norm.scale": ("post_attention_layernorm.weight", lambda t: t),
        "mlp.gate.weight": ("mlp.router.weight", lambda t: t),
        "mlp.gate.bias": ("mlp.router.bias", lambda t: t),
        "mlp.mlp1_weight.weight": ("mlp.experts.gate_up_proj", lambda t: t.transpose(1, 2)),  # (E, 2I, H) -> (E, H, 2I)
        "mlp.mlp1_bias": ("mlp.experts.gate_up_proj_bias", lambda t: t),
        "mlp.mlp2_weight.weight": ("mlp.experts.down_proj", lambda t: t.transpose(1, 2)),  # (E, H, I) -> (E, I, H)
        "mlp.mlp2_bias": ("mlp.experts.down_proj_bias", lambda t: t),
    }
    hf, view = per_layer[rest]
    return [pre + hf.format(part) for part in ("qkv" if "{}" in hf else [""])], view


def test_float32_gradients_match_transformers(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", SMALL, "hf", "dense", seed=1)
    tokens = torch.randint(0, SMALL.vocab_size, (80,), generator=torch.Generator().manual_seed(0))  # 5 windows
    ours = Transformer.from_checkpoint(folder, dtype=torch.float32).requires_grad_(True)  # loaded frozen
    theirs = transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager")
    loss = torch.nn.functional.cross_entropy(ours(tokens)[:-1], tokens[1:])
    loss.backward()
    hf_loss = theirs(tokens[None], labels=tokens[None]).loss
    hf_loss.backward()
    assert abs(loss.item() - hf_loss.item()) <= 1e-5 * hf_loss.item()
    hf_params = dict(theirs.named_parameters())
    checked = 0
    for name, param in ours.named_parameters():
        hf_names, view = hf_names_and_view(name)
        assert param.grad is not None, name
        expected = torch.cat([hf_params[n].grad for n in hf_names])
        assert expected.abs().max() > 0, name
        assert relative_error(view(param.grad), expected) <= 1e-5, name
        checked += 1
    assert checked == len(list(ours.parameters()))
