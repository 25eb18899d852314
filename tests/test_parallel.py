"""Tensor/expert parallelism (gptoss.parallel): each rank loads only its slices of a real checkpoint, and real
torch.distributed processes (gloo on the CPU) compute what one process computes."""

import asyncio
import dataclasses

import pytest
import torch
import torch.multiprocessing as mp

import gptoss.checkpoint
from conftest import SMALL, TRITON_INTERPRET_TESTS, relative_error
from gptoss.checkpoint import load_model
from gptoss.checkpoint_writer import write_checkpoint
from gptoss.engine import Engine, SamplingParams
from gptoss.errors import ConfigError
from gptoss.finetune import Example, train
from gptoss.generate import TokenGenerator
from gptoss.lora import add_lora, load_adapter, save_adapter
from gptoss.model import Transformer
from gptoss.parallel import Shard, held_ranges

# The ranks fork from a server process that has imported torch and gptoss once; spawned afresh, each rank would
# import them again (~3 s of CPU a rank).
mp.set_forkserver_preload(["test_parallel"])


def run_ranks(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) in world_size processes; raises if one fails."""
    mp.start_processes(_one_thread, args=(fn, world_size, *args), nprocs=world_size, start_method="forkserver")


def _one_thread(rank: int, fn, *args) -> None:
    """A rank computes on one thread: the ranks outnumber the CPU's cores, and each waits for the slowest at
    every collective."""
    torch.set_num_threads(1)
    fn(rank, *args)


# 4 KV heads so that 4 ranks can split them (SMALL has 2)
WIDE = dataclasses.replace(SMALL, num_attention_heads=8, num_key_value_heads=4)
LAYOUTS = {"original": ("original", "mxfp4", False), "hf-mxfp4": ("hf", "mxfp4", False),
           "hf-dense": ("hf", "dense", False), "dequantized": ("original", "mxfp4", True)}


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return {(layout, experts): write_checkpoint(root / f"{layout}-{experts}", WIDE, layout, experts, seed=3,
                                                num_shards=2)
            for layout, experts in {(lay, exp) for lay, exp, _ in LAYOUTS.values()}}


def held_part(full: torch.Tensor, key: str, shard: Shard) -> torch.Tensor:
    """The slices of a whole-model tensor that `shard` should hold, by the scheme's ranges."""
    held = held_ranges(key, WIDE, shard)
    if held is None:
        return full
    dim, ranges = held
    return torch.cat([full.narrow(dim, start, stop - start) for start, stop in ranges], dim=dim)


class CountingHandle:
    """A safetensors handle that counts the bytes of the tensors it hands out."""

    def __init__(self, handle, counter):
        self.handle, self.counter = handle, counter

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        return self._count(self.handle.get_tensor(name))

    def get_slice(self, name):
        sliced = self.handle.get_slice(name)
        return type("Slice", (), {"__getitem__": lambda _, index: self._count(sliced[index])})()

    def _count(self, tensor):
        self.counter[0] += tensor.numel() * tensor.element_size()
        return tensor


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_each_rank_loads_only_its_slices(wide_checkpoints, case, world_size, monkeypatch):
    layout, experts, dequantize = LAYOUTS[case]
    folder = wide_checkpoints[(layout, experts)]
    whole = load_model(folder, dtype=torch.float32, dequantize=dequantize).state_dict()
    real_open = gptoss.checkpoint.safe_open
    counter = [0]
    monkeypatch.setattr(gptoss.checkpoint, "safe_open", lambda *a, **k: CountingHandle(real_open(*a, **k), counter))
    load_model(folder, dtype=torch.float32, dequantize=dequantize)
    whole_bytes = counter[0]
    replicated = sum(t.numel() * t.element_size() for k, t in
                     load_model(folder, dtype=torch.float32).state_dict().items()
                     if held_ranges(k, WIDE, Shard(0, world_size)) is None and "rope" not in k)
    for rank in range(world_size):
        shard = Shard(rank, world_size)
        counter[0] = 0
        part = load_model(folder, dtype=torch.float32, dequantize=dequantize, shard=shard).state_dict()
        assert part.keys() == whole.keys()
        for key, tensor in part.items():
            assert torch.equal(tensor, held_part(whole[key], key, shard)), key
        assert counter[0] < whole_bytes / world_size + replicated, (counter[0], whole_bytes)


def run_rank(rank, world_size, folder, store, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = load_model(folder, dtype=torch.float32, shard=Shard(rank, world_size))
        tokens = torch.randint(0, WIDE.vocab_size, (70,), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(tokens)
        generator = TokenGenerator(None, "cpu", context_length=128, model=model)
        prompt = tokens[:40].tolist()
        greedy = list(generator.generate(prompt, (), temperature=0.0, max_tokens=12))
        sampled = list(generator.generate(prompt, (), temperature=1.0, max_tokens=12))  # unseeded: rank 0's seed
        torch.save({"logits": logits, "greedy": greedy, "sampled": sampled}, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_compute_what_one_process_does(wide_checkpoints, world_size, tmp_path):
    folder = wide_checkpoints[("original", "mxfp4")]
    run_ranks(run_rank, world_size, str(folder), tmp_path / "store", str(tmp_path / "out"))
    model = load_model(folder, dtype=torch.float32)
    tokens = torch.randint(0, WIDE.vocab_size, (70,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
    greedy = list(TokenGenerator(None, "cpu", context_length=128, model=model).generate(
        tokens[:40].tolist(), (), temperature=0.0, max_tokens=12))
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(world_size)]
    for result in results:
        assert relative_error(result["logits"], expected) <= 1e-5
        assert result["greedy"] == greedy
        assert result["sampled"] == results[0]["sampled"]


def run_fast_path_rank(rank, world_size, folder, store, results):
    """The GPU fast path on a shard, on the CPU through Triton's interpreter (every Triton dispatch of gptoss.model
    on, and the engine built as on a GPU): TritonKVCache's prefill and decode steps; the engine's paged decode step
    run eagerly (as a shard runs it) over TritonPagedKVCache; and the engine itself, warm-up included (rank 0
    runs it, the others follow), serving requests."""
    import gptoss.engine
    import gptoss.model
    from gptoss.cuda_cache import TritonKVCache, TritonPagedKVCache
    from gptoss.cuda_graph import GraphedBatchDecode

    gptoss.model.use_triton = lambda *tensors: True
    gptoss.engine.triton_device = lambda x: True
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = load_model(folder, dtype=torch.float32, shard=Shard(rank, world_size))
        tokens = fast_path_tokens()
        with torch.inference_mode():
            cache = TritonKVCache(model.local_config, context_length=len(tokens), dtype=torch.float32)
            one = [model(tokens[:20], cache.reserve(20), cache)]  # longer than the window: the ring wraps
            one += [model(tokens[i : i + 1], cache.reserve(1), cache) for i in range(20, len(tokens))]
            paged = TritonPagedKVCache(model.local_config, num_blocks=8, block_size=4, dtype=torch.float32)
            tables, prompts = [[0, 1, 2], [3, 4, 5, 6, 7]], (7, 17)
            positions = paged.prepare([(t, 0, n) for t, n in zip(tables, prompts)])
            model(torch.cat([tokens[:prompts[0]], tokens[:prompts[1]]]), positions, paged)
            paged.finish()
            steps = GraphedBatchDecode(model, paged, max_batch=4, max_context=20, capture_graphs=False)
            decoded = [steps(torch.stack([tokens[n + j] for n in prompts]),
                             [(t, n + j, n + j + 1) for t, n in zip(tables, prompts)]) for j in range(2)]
        served = small_engine_outputs(model, warm_up=True)
        torch.save({"one": torch.cat(one), "paged": torch.stack(decoded), "served": served}, f"{results}.{rank}")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def fast_path_tokens() -> torch.Tensor:
    return torch.randint(0, WIDE.vocab_size, (24,), generator=torch.Generator().manual_seed(4))


def small_engine_outputs(model, warm_up: bool = False) -> dict:
    """Two greedy requests through a small engine: {"tokens": their tokens (rank 0 or one process; None on the
    other ranks, which follow), "warm_up_steps": the steps this rank ran in the engine's warm-up}."""
    engine = Engine(model, max_batch_size=2, context_length=40, block_size=4, num_blocks=20, max_prefill_tokens=16)
    forward, warm_up_steps = engine._forward, []
    engine._forward = lambda *args: warm_up_steps.append(len(args[1])) or forward(*args)
    if warm_up:
        engine.warm_up()
    engine._forward = forward
    if model.shard.rank != 0:
        engine.follow()
        return {"tokens": None, "warm_up_steps": warm_up_steps}
    prompts = [fast_path_tokens()[:9].tolist(), fast_path_tokens()[5:16].tolist()]

    async def run_all():
        async def one(prompt):
            params = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=())
            return [out.token async for out in engine.generate(prompt, params)]
        return await asyncio.gather(*(one(p) for p in prompts))

    engine.start()
    try:
        return {"tokens": asyncio.run(run_all()), "warm_up_steps": warm_up_steps}
    finally:
        engine.stop()


@pytest.mark.skipif(not TRITON_INTERPRET_TESTS, reason="runs where Triton's interpreter is in use")
def test_fast_path_on_shards_computes_what_one_process_does(tmp_path):
    """Attention over a shard's heads through the Triton kernels and caches, and the Triton MoE over a shard's
    experts (each rank's float32 share summed over the ranks), give the one-process pure logits; the engine built
    as on a GPU (warm-up in lockstep, eager decode steps) serves the one-process tokens."""
    pytest.importorskip("triton")
    two_layers = dataclasses.replace(WIDE, num_hidden_layers=2)  # a sliding-window layer and a full layer
    folder = write_checkpoint(tmp_path / "ckpt", two_layers, "original", seed=6)
    run_ranks(run_fast_path_rank, 2, str(folder), tmp_path / "store", str(tmp_path / "out"))
    model = load_model(folder, dtype=torch.float32)
    tokens = fast_path_tokens()
    with torch.no_grad():
        pure = model(tokens)
        # the paged steps' sequences: prompts of 7 and 17 tokens of `tokens`, then 2 decode steps each
        paged = torch.stack([torch.stack([model(tokens[: n + j + 1])[-1] for n in (7, 17)]) for j in range(2)])
    served = small_engine_outputs(model)["tokens"]
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    for result in results:
        assert relative_error(result["one"], pure) <= 1e-5
        assert relative_error(result["paged"], paged) <= 1e-5
        assert result["served"]["warm_up_steps"] == [1, 2]  # a decode step of each batch bucket, on both ranks
    assert results[0]["served"]["tokens"] == served and results[1]["served"]["tokens"] is None


def run_engine_rank(rank, world_size, folder, store, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = load_model(folder, dtype=torch.float32, shard=Shard(rank, world_size))
        torch.save(engine_outputs(model), f"{results}.{rank}")
        torch.distributed.barrier()  # leave together (gloo's teardown can abort a rank still talking)
    finally:
        torch.distributed.destroy_process_group()


def engine_outputs(model) -> list[list[int]] | None:
    """Rank 0 (or one process): the tokens of concurrent requests (greedy and seeded, prompts sharing a prefix,
    a 2-block cache per request so that some are preempted); other ranks: follow rank 0's engine, None."""
    engine = Engine(model, max_batch_size=4, context_length=96, block_size=8, num_blocks=20)
    if model.shard.rank != 0:
        engine.follow()
        return None
    prompts = [[(7 * i + j) % WIDE.vocab_size for j in range(30)] for i in range(3)] + [[5] * 30 + [9, 10, 11]]
    params = [SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 1.0, seed=i, stop_token_ids=())
              for i in range(len(prompts))]

    async def run_all():
        async def one(prompt, param):
            return [out.token async for out in engine.generate(prompt, param)]
        return await asyncio.gather(*(one(p, q) for p, q in zip(prompts, params)))

    engine.start()
    try:
        return asyncio.run(run_all())
    finally:
        engine.stop()


def test_engine_ranks_serve_what_one_process_serves(wide_checkpoints, tmp_path):
    folder = wide_checkpoints[("original", "mxfp4")]
    run_ranks(run_engine_rank, 2, str(folder), tmp_path / "store", str(tmp_path / "out"))
    expected = engine_outputs(load_model(folder, dtype=torch.float32))
    assert torch.load(tmp_path / "out.0") == expected and torch.load(tmp_path / "out.1") is None


def test_uneven_split_is_refused():
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(2\) cannot be split evenly over 3 ranks"):
        Transformer(SMALL, shard=Shard(0, 3), device="meta")


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_merges_its_slices_of_an_adapter(wide_checkpoints, world_size, tmp_path):
    """An adapter on the attention and every expert, merged by each rank of a tensor/expert-parallel model (experts
    dequantized), gives the slices of the one-process merged weights that the rank holds."""
    folder = wide_checkpoints[("original", "mxfp4")]
    trained = load_model(folder, dtype=torch.float32, dequantize=True)
    for factor in add_lora(trained, rank=4, alpha=8):
        factor.data.normal_(generator=torch.Generator().manual_seed(factor.numel()))  # B no longer zero
    save_adapter(trained, tmp_path / "adapter")
    whole = load_model(folder, dtype=torch.float32, dequantize=True)
    load_adapter(whole, tmp_path / "adapter")
    whole_state = whole.state_dict()
    merged_keys = [key for key in whole_state if key.endswith(("qkv.weight", "out.weight", "_weight.weight"))]
    assert len(merged_keys) == 4 * WIDE.num_hidden_layers
    for rank in range(world_size):
        shard = Shard(rank, world_size)
        part = load_model(folder, dtype=torch.float32, dequantize=True, shard=shard)
        load_adapter(part, tmp_path / "adapter")
        for key, tensor in part.state_dict().items():
            assert torch.equal(tensor, held_part(whole_state[key], key, shard)), key


def training_run(model, folder) -> list[float]:
    """LoRA on the attention and every expert, 4 optimizer steps (2 examples each, gradients clipped every step),
    the adapter saved to folder; returns the steps' losses."""
    torch.manual_seed(0)
    params = add_lora(model, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(9)
    examples = [Example(torch.randint(0, WIDE.vocab_size, (n,), generator=gen).tolist(), n // 2)
                for n in (12, 20, 17, 9)]
    losses = train(model, params, examples, epochs=2, lr=1e-2, batch_size=2, max_grad_norm=1e-3, progress=False)
    save_adapter(model, folder)
    return losses


def run_training_rank(rank, world_size, folder, store, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = load_model(folder, dtype=torch.float32, shard=Shard(rank, world_size))
        torch.save(training_run(model, f"{results}.adapter"), f"{results}.{rank}")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_train_what_one_process_trains(wide_checkpoints, tmp_path):
    """Fine-tuning a tensor/expert-parallel model (gradients through the collectives, replicated factors' gradients
    summed, the clipping norm over every rank's slices) gives one process's losses and adapter; rank 0 writes the
    whole adapter."""
    from safetensors.torch import load_file

    folder = wide_checkpoints[("original", "mxfp4")]
    run_ranks(run_training_rank, 2, str(folder), tmp_path / "store", str(tmp_path / "out"))
    expected = training_run(load_model(folder, dtype=torch.float32), tmp_path / "alone")
    for rank in range(2):
        assert torch.load(tmp_path / f"out.{rank}") == pytest.approx(expected, rel=1e-5)
    ranks = load_file(tmp_path / "out.adapter" / "adapter.safetensors")
    alone = load_file(tmp_path / "alone" / "adapter.safetensors")
    assert ranks.keys() == alone.keys()
    for name in alone:  # AdamW turns float noise in tiny gradients into differences of ~1e-5; a wrong gradient ~1e-2
        torch.testing.assert_close(ranks[name], alone[name], rtol=1e-3, atol=1e-4, msg=name)
    assert any(alone[name].abs().max() > 0 for name in alone if name.endswith("lora_b"))  # it trained
