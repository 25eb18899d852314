"""The blocked sink attention used in training (gptoss.kernels.attention_training) against autograd through the
reference sink_attention: outputs and the gradients of q, k, v and the sinks, with GQA, sliding windows and
query blocks that do not divide the sequence."""

import pytest
import torch

from conftest import relative_error
from gptoss.kernels import attention_training
from gptoss.kernels.attention import attention_mask, sink_attention
from gptoss.kernels.attention_training import sink_attention_blocked


def inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 8, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(n, 2, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(n, 2, 16, generator=g).to(dtype).requires_grad_()
    sinks = (torch.randn(8, generator=g) * 2).to(dtype).requires_grad_()
    grad_out = torch.randn(n, 8, 16, generator=g).to(dtype)
    return (q, k, v, sinks), grad_out


@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("n", [1, 33, 100])
def test_blocked_attention_and_its_gradients_equal_the_reference(monkeypatch, n, window):
    monkeypatch.setattr(attention_training, "BLOCK", 16)  # several blocks, the last one partial
    tensors, grad_out = inputs(n, torch.float32)
    positions = torch.arange(n)
    ref = sink_attention(*tensors, attention_mask(positions, positions, window), 0.25)
    ref_grads = torch.autograd.grad(ref, tensors, grad_out)
    out = sink_attention_blocked(*tensors, positions, window, 0.25)
    grads = torch.autograd.grad(out, tensors, grad_out)
    assert relative_error(out.detach(), ref.detach()) <= 1e-6
    for name, got, expected in zip("q k v sinks".split(), grads, ref_grads):
        assert relative_error(got, expected) <= 1e-5, name


def test_bfloat16_gradients_come_back_in_bfloat16():
    tensors, grad_out = inputs(40, torch.bfloat16)
    positions = torch.arange(40)
    out = sink_attention_blocked(*tensors, positions, 16, 0.25)
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref = sink_attention(*tensors, attention_mask(positions, positions, 16), 0.25)
    ref_grads = torch.autograd.grad(ref, tensors, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert relative_error(out.detach(), ref.detach()) <= 1e-2
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got, expected) <= 2e-2
