import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SMALL
from gptoss.checkpoint import inspect_checkpoint, load_model
from gptoss.errors import CheckpointError, ConfigError
from gptoss.model import Transformer


@torch.no_grad()
def test_every_layout_gives_identical_logits(checkpoints):
    tokens = torch.randint(0, SMALL.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    logits = {name: load_model(folder, dtype=torch.float32)(tokens) for name, folder in checkpoints.items()}
    reference = logits.pop("original-mxfp4-1")
    for name, value in logits.items():
        assert torch.equal(value, reference), name


def test_layouts_are_detected(checkpoints):
    assert inspect_checkpoint(checkpoints["original-mxfp4-3"]).layout == "original"
    assert len({t.file for t in inspect_checkpoint(checkpoints["original-mxfp4-3"]).tensors.values()}) == 3
    info = inspect_checkpoint(checkpoints["hf-dense-2"])
    assert (info.layout, info.experts) == ("hf", "dense")


def test_experts_stay_packed_unless_asked(checkpoints):
    model = load_model(checkpoints["original-mxfp4-1"])
    assert model.block[0].mlp.mlp1_weight.blocks.dtype == torch.uint8
    assert not any(p.dtype == torch.bfloat16 and p.dim() == 3 for p in model.parameters())
    dense = load_model(checkpoints["original-mxfp4-1"], dequantize=True, dtype=torch.float32)
    packed = load_model(checkpoints["original-mxfp4-1"], dtype=torch.float32)
    assert dense.block[0].mlp.mlp1_weight.weight.shape == (SMALL.num_experts, 2 * SMALL.intermediate_size,
                                                             SMALL.hidden_size)
    tokens = torch.arange(20)
    with torch.no_grad():
        assert torch.equal(dense(tokens), packed(tokens))


def test_hf_repo_root_with_original_subfolder(checkpoints, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(checkpoints["original-mxfp4-1"], root / "original")
    assert inspect_checkpoint(root).layout == "original"


def test_from_checkpoint_is_the_public_entry_point(checkpoints):
    model = Transformer.from_checkpoint(checkpoints["hf-mxfp4-2"], device="cpu")
    assert model.dtype == torch.bfloat16 and model(torch.tensor([1, 2, 3])).shape == (3, SMALL.vocab_size)


def broken_copy(checkpoints, tmp_path, name="original-mxfp4-1"):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints[name], folder)
    return folder


def rewrite_tensors(file, change):
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_missing_tensor(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    rewrite_tensors(folder / "model.safetensors", lambda t: t.pop("block.2.attn.sinks"))
    with pytest.raises(CheckpointError, match="missing tensor 'block.2.attn.sinks'"):
        load_model(folder)


def test_wrong_shape(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    rewrite_tensors(folder / "model.safetensors", lambda t: t.update({"norm.scale": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'norm.scale' has shape \[3\]"):
        load_model(folder)


def test_wrong_dtype(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    def to_float(t):
        t["block.0.mlp.mlp1_weight.scales"] = t["block.0.mlp.mlp1_weight.scales"].float()
    rewrite_tensors(folder / "model.safetensors", to_float)
    with pytest.raises(CheckpointError, match="'block.0.mlp.mlp1_weight.scales' has dtype F32, expected U8"):
        load_model(folder)


def test_truncated_file(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path, "hf-mxfp4-2")
    file = folder / "model-00002-of-00002.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: truncated"):
        load_model(folder)


def test_not_a_safetensors_file(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(folder)


def test_unknown_layout(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'model_type' is 'llama'"):
        load_model(folder)
    rewrite_tensors(folder / "model.safetensors", lambda t: t.update({"lm_head.weight": torch.ones(1)}))
    (folder / "config.json").write_text(json.dumps(SMALL.to_dict()))
    with pytest.raises(CheckpointError, match="unexpected tensor 'lm_head.weight' for a original layout"):
        load_model(folder)


def test_cli_reports_a_bad_checkpoint_in_one_line(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    rewrite_tensors(folder / "model.safetensors", lambda t: t.pop("embedding.weight"))
    result = subprocess.run([sys.executable, "-m", "gptoss.cli", "generate", str(folder), "-p", "hi"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"gptoss: error: {folder}: missing tensor 'embedding.weight'"
    )
    assert "Traceback" not in result.stderr


def test_config_that_is_not_json(checkpoints, tmp_path):
    folder = broken_copy(checkpoints, tmp_path)
    (folder / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_model(folder)
