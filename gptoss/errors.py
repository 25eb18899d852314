"""User-facing errors: one line that names the file, tensor, field or limit at fault.

The CLI prints `str(err)` and exits non-zero; no traceback reaches the user for these.
"""


class GptOssError(Exception):
    """Base class for every error caused by bad input (checkpoints, configs, prompts, requests)."""


class CheckpointError(GptOssError):
    """A checkpoint folder, file or tensor is missing, malformed or inconsistent."""


class ConfigError(GptOssError):
    """A config value is unknown, missing or contradictory."""


class ContextLengthError(GptOssError):
    """A prompt or generation would run past the KV cache's context length."""
