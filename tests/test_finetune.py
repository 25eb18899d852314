"""LoRA fine-tuning (gptoss.lora, gptoss.finetune) on the CPU: adapters start as the identity, only their factors
learn, a trained adapter merged into the weights computes what the adapted model computes, and `gptoss finetune`
runs from JSON Lines to an adapter folder that generate loads."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import SMALL, random_model
from gptoss.checkpoint import load_model
from gptoss.checkpoint_writer import write_checkpoint
from gptoss.config import preset
from gptoss.errors import GptOssError
from gptoss.finetune import example_from_chat, example_loss, load_examples, train
from gptoss.lora import add_lora, load_adapter, save_adapter
from gptoss.tokenizer import get_tokenizer

CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "reasoning_content": "Simple sum.", "content": "4"}],
        "reasoning_effort": "low"}
TINY = preset("tiny")  # the tokenizer's vocabulary: chats render to real token ids
TOKENS = torch.tensor([5, 77, 300, 12, 901, 44, 3, 250, 17, 600] * 4)  # 40 tokens: past the 16-token window


def test_a_fresh_adapter_leaves_the_model_unchanged():
    model = random_model()
    with torch.no_grad():
        before = model(TOKENS)
    params = add_lora(model, rank=4)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), before)
    layers, experts = SMALL.num_hidden_layers, SMALL.num_experts
    assert len(params) == layers * (2 * 2 + 2 * 2)  # qkv, out, mlp1, mlp2: an (A, B) pair each
    assert sum(p.numel() for p in params if p.dim() == 3) == layers * experts * 4 * (
        SMALL.hidden_size + 2 * SMALL.intermediate_size + SMALL.intermediate_size + SMALL.hidden_size)


def test_only_the_factors_learn():
    model = random_model()
    params = add_lora(model, rank=4)
    loss = torch.nn.functional.cross_entropy(model(TOKENS)[:-1], TOKENS[1:])
    loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):  # B = 0: A's gradient is 0 until B moves, B's is not
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    routed = model.block[0].mlp.mlp1_weight.lora_b.grad.flatten(1).abs().sum(1) > 0
    assert 0 < routed.sum() <= SMALL.num_experts  # each expert's factors learn from its own tokens only
    assert len(params) == sum(1 for name, _ in model.named_parameters() if "lora_" in name)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        model = random_model()
        torch.manual_seed(0)  # the same A factors
        add_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    p.normal_(generator=torch.Generator().manual_seed(len(name)))  # A's gradients nonzero too
        model.gradient_checkpointing = recompute
        torch.nn.functional.cross_entropy(model(TOKENS)[:-1], TOKENS[1:]).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_training_lowers_the_loss_and_the_merged_adapter_computes_the_same(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", TINY, "original", seed=2)
    model = load_model(folder, dtype=torch.float32)
    params = add_lora(model, rank=4, alpha=8)
    example = example_from_chat(CHAT, "chat", max_length=4096)
    with torch.no_grad():
        first, count = example_loss(model, example)
    losses = train(model, params, [example], epochs=12, lr=1e-2, seed=0, progress=False)
    assert losses[-1] < 0.5 * losses[0] and abs(losses[0] - first.item() / count) < 1e-4
    with torch.no_grad():
        adapted = model(TOKENS)
    save_adapter(model, tmp_path / "adapter")
    merged = load_model(folder, dtype=torch.float32, dequantize=True)
    load_adapter(merged, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(merged(TOKENS), adapted)
        assert not torch.equal(load_model(folder, dtype=torch.float32)(TOKENS), adapted)
    with pytest.raises(GptOssError, match="MXFP4 experts, which cannot take a merged update"):
        load_adapter(load_model(folder, dtype=torch.float32), tmp_path / "adapter")


def test_an_example_trains_its_last_assistant_turn():
    example = example_from_chat(CHAT, "chat", max_length=4096)
    target = get_tokenizer().decode(example.tokens[example.first_target:])
    assert target == "<|channel|>analysis<|message|>Simple sum.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    assert get_tokenizer().decode(example.tokens[:example.first_target]).endswith(
        "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant")


@pytest.mark.parametrize("line, message", [
    ("not json", r"data.jsonl:2: not JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"data.jsonl:2: messages: the example must end"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
     r"data.jsonl:2: messages\[0\].role: unknown role"),
    (json.dumps({"prompt": "hi"}), r"data.jsonl:2: expected an object with a \"messages\" list"),
])
def test_bad_examples_name_their_line(tmp_path, line, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(CHAT) + "\n" + line + "\n")
    with pytest.raises(GptOssError, match=message):
        load_examples(str(data), max_length=4096)


def test_finetune_command_writes_an_adapter_that_generate_loads(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", TINY, "original", seed=3)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({**CHAT, "messages": [{"role": "user", "content": f"Say {word}."},
                                                              {"role": "assistant", "content": word}]})
                              for word in ("red", "green", "blue")) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def gptoss(*args):
        return subprocess.run([sys.executable, "-m", "gptoss", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    done = gptoss("finetune", str(folder), "--data", str(data), "--eval-data", str(data), "--out",
                  str(tmp_path / "adapter"), "--device", "cpu", "--epochs", "2", "--rank", "2", "--lr", "5e-3")
    assert done.returncode == 0, done.stderr
    found = re.search(r"6 steps over 3 examples in .* s, loss [\d.]+ -> [\d.]+; held-out loss ([\d.]+) -> ([\d.]+) "
                      r"over 3 examples; adapter \([\d,]+ parameters\)", done.stderr)
    assert found and float(found[2]) < float(found[1]), done.stderr  # trained on the same chats: lower
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter.safetensors", "adapter_config.json"]
    prompt = ["-p", "Say red.", "-n", "3", "-t", "0", "--device", "cpu"]
    adapted = gptoss("generate", str(folder), "--adapter", str(tmp_path / "adapter"), "--dequantize", *prompt)
    assert adapted.returncode == 0, adapted.stderr
    refused = gptoss("generate", str(folder), "--adapter", str(tmp_path / "adapter"), *prompt)
    assert refused.returncode == 2 and "--dequantize" in refused.stderr.strip().splitlines()[-1]
    # attention-only adapters merge into a model whose experts stay packed
    done = gptoss("finetune", str(folder), "--data", str(data), "--out", str(tmp_path / "attn"), "--device", "cpu",
                  "--targets", "attention", "--rank", "2")
    assert done.returncode == 0, done.stderr
    packed = gptoss("generate", str(folder), "--adapter", str(tmp_path / "attn"), *prompt)
    assert packed.returncode == 0, packed.stderr
    bad = gptoss("finetune", str(folder), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "missing.jsonl: cannot read" in bad.stderr and not (tmp_path / "x").exists()
