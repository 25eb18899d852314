"""The pure-PyTorch model against an independent implementation: Hugging Face transformers' GptOssForCausalLM,
loaded by transformers itself from the HF-layout checkpoint our writer produced (same weights)."""

import dataclasses

import pytest
import torch

from conftest import SMALL, relative_error
from gptoss.checkpoint_writer import write_checkpoint
from gptoss.model import Transformer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", SMALL, "hf", "dense", seed=1)


def load_hf(folder, dtype):
    return transformers.GptOssForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def test_float32_logits_match_transformers_over_several_windows(hf_folder):
    tokens = torch.randint(0, SMALL.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    ours = Transformer.from_checkpoint(hf_folder, dtype=torch.float32)(tokens)
    theirs = load_hf(hf_folder, torch.float32)(tokens[None]).logits[0]
    assert relative_error(ours, theirs) <= 1e-5


@torch.no_grad()
def test_float32_logits_match_transformers_past_4096_positions(hf_folder):
    tokens = torch.randint(0, SMALL.vocab_size, (96,), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(5000, 5096)
    ours = Transformer.from_checkpoint(hf_folder, dtype=torch.float32)(tokens, positions)
    theirs = load_hf(hf_folder, torch.float32)(tokens[None], position_ids=positions[None]).logits[0]
    assert relative_error(ours, theirs) <= 1e-5


@torch.no_grad()
def test_bfloat16_logits_match_transformers(tmp_path):
    # Two layers (one sliding, one full) over four windows. With random routers, bf16 rounding flips a token's
    # top-4 now and then, which moves its logits by ~20%; these seeds have none, so the comparison measures
    # plain bf16 noise.
    config = dataclasses.replace(SMALL, num_hidden_layers=2)
    folder = write_checkpoint(tmp_path / "ckpt", config, "hf", "dense", seed=1)
    tokens = torch.randint(0, config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    ours = Transformer.from_checkpoint(folder, dtype=torch.bfloat16)(tokens)
    theirs = load_hf(folder, torch.bfloat16)(tokens[None]).logits[0]
    assert relative_error(ours, theirs) <= 2e-2


@torch.no_grad()
def test_bfloat16_error_is_no_worse_than_transformers(hf_folder):
    tokens = torch.randint(0, SMALL.vocab_size, (200,), generator=torch.Generator().manual_seed(2))
    exact = Transformer.from_checkpoint(hf_folder, dtype=torch.float32)(tokens)
    ours = Transformer.from_checkpoint(hf_folder, dtype=torch.bfloat16)(tokens)
    theirs = load_hf(hf_folder, torch.bfloat16)(tokens[None]).logits[0]
    assert relative_error(ours, exact) <= 1.5 * relative_error(theirs, exact) + 5e-3
