"""gptoss: a PyTorch-native engine for OpenAI's open-weight gpt-oss models."""

from gptoss.config import ModelConfig, preset
from gptoss.errors import CheckpointError, ConfigError, ContextLengthError, GptOssError

_TORCH_EXPORTS = {"TokenGenerator": "gptoss.generate", "Transformer": "gptoss.model"}


def __getattr__(name: str):
    """The model and generator import torch (seconds); imported on first use, so that `gptoss --help` and the
    command's argument errors answer at once."""
    if name in _TORCH_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_TORCH_EXPORTS[name]), name)
    raise AttributeError(f"module 'gptoss' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "GptOssError",
    "ModelConfig",
    "TokenGenerator",
    "Transformer",
    "preset",
]
