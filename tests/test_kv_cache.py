"""KV-cached forward passes equal the full forward (float32)."""

import pytest
import torch

from conftest import SMALL, random_model, relative_error
from gptoss.errors import ContextLengthError
from gptoss.kv_cache import KVCache

WINDOW = SMALL.sliding_window


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, SMALL.vocab_size, (4 * WINDOW + 5,), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_token_by_token_decode_equals_full_forward(model, tokens):
    full = model(tokens)
    cache = KVCache(SMALL, len(tokens), dtype=torch.float32)
    stepped = torch.cat([model(t[None], cache.reserve(1), cache) for t in tokens])
    assert relative_error(stepped, full) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(7, 40, 1, 21), (WINDOW, WINDOW, 2 * WINDOW + 5), (3 * WINDOW + 1, 1, 1)])
def test_chunked_prefill_at_offsets_equals_full_forward(model, tokens, chunks):
    # chunks longer than the window, shorter than it, and single tokens after a long chunk
    full = model(tokens)
    cache = KVCache(SMALL, len(tokens), dtype=torch.float32)
    outputs, start = [], 0
    for size in chunks:
        chunk = tokens[start : start + size]
        outputs.append(model(chunk, cache.reserve(len(chunk)), cache))
        start += size
    outputs += [model(t[None], cache.reserve(1), cache) for t in tokens[start:]]
    assert relative_error(torch.cat(outputs), full) <= 1e-5


def test_sliding_layers_keep_a_ring_of_window_slots(model, tokens):
    cache = KVCache(SMALL, 10 * WINDOW, dtype=torch.float32)
    sliding = [i for i in range(SMALL.num_hidden_layers) if SMALL.layer_window(i)]
    full = [i for i in range(SMALL.num_hidden_layers) if not SMALL.layer_window(i)]
    assert all(cache.keys[i].shape[0] == WINDOW for i in sliding)
    assert all(cache.keys[i].shape[0] == 10 * WINDOW for i in full)
    with torch.no_grad():
        model(tokens, cache.reserve(len(tokens)), cache)
    # after wrapping, each ring slot holds the latest position that maps to it
    last = len(tokens) - 1
    expected = torch.tensor([last - ((last - s) % WINDOW) for s in range(WINDOW)])
    assert torch.equal(cache.slot_positions[sliding[0]], expected)


def test_reserving_past_the_context_is_an_error():
    cache = KVCache(SMALL, 8)
    cache.reserve(6)
    with pytest.raises(ContextLengthError, match="context length of 8"):
        cache.reserve(3)


def test_context_length_is_bounded_by_the_model():
    with pytest.raises(ContextLengthError, match="131072"):
        KVCache(SMALL, 131073)
