"""gptoss: a PyTorch-native engine for OpenAI's open-weight gpt-oss models."""

from gptoss.config import ModelConfig, preset
from gptoss.errors import CheckpointError, ConfigError, ContextLengthError, GptOssError
from gptoss.generate import TokenGenerator
from gptoss.model import Transformer

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
