"""The engine's graphed decode step metadata (gptoss.cuda_cache.DecodeStep), built on the host before each step.
The module imports the Triton kernels, so it needs triton; the metadata itself is checked on CPU tensors."""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from gptoss.config import preset  # noqa: E402
from gptoss.cuda_cache import DecodeStep, TritonPagedKVCache  # noqa: E402


def test_fill_writes_each_row_and_pads_the_rest():
    config = dataclasses.replace(preset("tiny"), vocab_size=64)
    cache = TritonPagedKVCache(config, num_blocks=40, block_size=4)
    step = DecodeStep(cache, max_batch=8, max_context=64)
    step.fill([([7, 3, 9], 9, 10), ([1], 0, 1), ([5, 6], 4, 5)], batch=4)  # an earlier, longer step
    entries = [([2, 5], 6, 7), ([11], 0, 1), ([4, 8, 12, 30], 13, 14)]
    step.fill(entries, batch=4)
    device = {name: t[:4] for name, t in step.device.items()}
    assert device["positions"].tolist() == [6, 0, 13, 0]
    # slot = block holding the position * block size + offset in the block; the padding row writes to scratch
    assert device["slots"].tolist() == [5 * 4 + 2, 11 * 4 + 0, 30 * 4 + 1, cache.scratch_slot]
    assert device["seq_lens"].tolist() == [7, 1, 14, 0]  # the padding row reads nothing
    assert device["block_table"][0, :2].tolist() == [2, 5]
    assert device["block_table"][1, :1].tolist() == [11]
    assert device["block_table"][2, :4].tolist() == [4, 8, 12, 30]
