import json

import pytest

from gptoss.config import PRESETS, ModelConfig, preset
from gptoss.errors import ConfigError

ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096, "rope_theta": 150000,
    "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


def test_original_config_gives_the_20b_preset():
    assert ModelConfig.from_dict(ORIGINAL_20B) == preset("gpt-oss-20b")
    assert preset("gpt-oss-20b").max_context_length == 131072


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    config = preset(name)
    assert ModelConfig.from_dict(config.to_hf_dict()) == config


def test_hf_config_with_rope_parameters():
    raw = preset("gpt-oss-120b").to_hf_dict()
    rope = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {**rope, "rope_theta": 150000.0}
    assert ModelConfig.from_dict(raw) == preset("gpt-oss-120b")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": 0}, "'num_experts' must be a positive number"),
        ({"head_dim": "64"}, "'head_dim' must be a number"),
        ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
        ({"hidden_size": 2881}, "hidden_size .* multiple of 32"),
        ({"experts_per_token": 40}, "exceeds num_experts"),
        ({"num_hidden_layers": 2.5}, "'num_hidden_layers' must be an integer"),
        ({"mystery": 1}, "unknown field 'mystery'"),
    ],
)
def test_bad_original_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**ORIGINAL_20B, **change})


def test_missing_original_field():
    raw = dict(ORIGINAL_20B)
    del raw["sliding_window"]
    with pytest.raises(ConfigError, match="missing field 'sliding_window'"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["full_attention"] * 24}, "'layer_types' must alternate"),
        ({"rms_norm_eps": 1e-6}, "'rms_norm_eps'"),
        ({"num_experts": 16}, "'num_local_experts' .* contradicts 'num_experts'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2}}, "must be 'yarn'"),
    ],
)
def test_bad_hf_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**preset("gpt-oss-20b").to_hf_dict(), **change})


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_file(path)
    path.write_text(json.dumps({**ORIGINAL_20B, "vocab_size": -1}))
    with pytest.raises(ConfigError, match=r"config.json: .*'vocab_size'"):
        ModelConfig.from_file(path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpt-oss-7b'"):
        preset("gpt-oss-7b")
