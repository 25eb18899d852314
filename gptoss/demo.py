"""The built-in demo checkpoint: the tiny preset with random weights, written once into a cache folder."""

import os
from pathlib import Path

from gptoss.checkpoint_writer import write_checkpoint
from gptoss.config import preset

DEMO_NAME = "demo-tiny-v1"


def demo_checkpoint_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gptoss" / DEMO_NAME


def ensure_demo_checkpoint() -> Path:
    """Returns the demo checkpoint folder, writing it first if needed (atomically: never half-written)."""
    folder = demo_checkpoint_dir()
    if not (folder / "config.json").exists():
        try:
            write_checkpoint(folder, preset("tiny"), seed=0)
        except OSError:  # another process (a torchrun rank, say) wrote it first
            if not (folder / "config.json").exists():
                raise
    return folder
