"""Every Triton kernel the fast path launches builds for GPUs before Hopper (issue #3 point 6), checked on the CPU.

A child process runs a tiny bf16 model through the GPU code paths under Triton's interpreter (a prefill with the
grouped-GEMM MoE and flash attention, decode steps with the GEMV MoE, the paged cache's batched step, split-K decode
attention, keyed sampling, the dequantizing grouped GEMM of long prefills, the grouping of many pairs by expert) and
records each kernel launch: its argument types, constexprs and warps. A second child, without the interpreter,
compiles each recorded specialization through PTX and ptxas for sm_80 (A100) and sm_89 (L4, RTX 40xx) as those GPUs
launch it (programmatic dependent launch off, the interpreter's float32 stand-ins for the MMAs off, the MoE GEMM
also with its tl.dot_scaled tiles), and for sm_90 with PDL on, as the H100 runs them (so a CPU test run also catches
a Hopper build broken between GPU sessions). A build proves that no sm_90-only instruction is required; it does not
run the kernels. The Gluon kernels have their own build test (test_moe_mma_build.py); scripts/compile_for_arch.py
does this on a GPU for the autotuner's candidates too.
"""

import importlib
import inspect
import json
import sys

import pytest

ARCHS = (80, 89, 90)


def _constant(value):
    """A constexpr as JSON (Triton dtypes by name)."""
    import triton.language as tl

    return {"dtype": str(value)} if isinstance(value, tl.dtype) else value


def record(path: str) -> None:
    """Runs the fast paths under the interpreter and writes the kernel specializations they launched to path."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type  # the type Triton's launcher gives an argument

    launched = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
        signature, constants = {}, {}
        for name, param in params.items():
            value = bound.get(name, param.default)
            if "constexpr" in str(param.annotation) or value is None:
                constants[name] = _constant(value)
            else:
                signature[name] = mangle_type(value)
        spec = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": signature,
                "constants": constants, "num_warps": kwargs.get("num_warps", 4)}
        launched[json.dumps(spec, sort_keys=True)] = spec
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    import gptoss.model
    from conftest import SMALL, random_model
    from gptoss.cuda_cache import DecodeStep, TritonKVCache, TritonPagedKVCache
    from gptoss.kernels.attention_triton import decode_attention
    from gptoss.kernels.moe_grouping import GROUP_ONEHOT, group_pairs
    from gptoss.kernels.moe_triton import moe_triton_from_stores
    from gptoss.kernels.sample_triton import exponential_race

    config = type(SMALL)(**{**SMALL.__dict__, "num_hidden_layers": 2})
    model = random_model(config, dtype=torch.bfloat16)
    gptoss.model.use_triton = lambda *tensors: True
    tokens = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = TritonKVCache(config, context_length=len(tokens), dtype=torch.bfloat16)
        model(tokens[:20], cache.reserve(20), cache)
        for i in range(20, 22):
            logits = model(tokens[i : i + 1], cache.reserve(1), cache)
        paged = TritonPagedKVCache(config, num_blocks=8, block_size=4, dtype=torch.bfloat16)
        tables = [[0, 1, 2], [3, 4, 5]]
        model(tokens[:14], paged.prepare([(t, 0, 7) for t in tables]), paged, logits_rows=torch.tensor([6, 13]))
        paged.finish()
        step = DecodeStep(paged, max_batch=2, max_context=12)
        step.fill([(t, 7, 8) for t in tables], batch=2)
        paged.decode_step = step.view(2)
        model(tokens[7:9], paged.decode_step.positions, paged)
        paged.decode_step = None
        exponential_race(logits.float(), torch.ones(1), None, torch.tensor([1]), torch.tensor([0]))
        exponential_race(torch.randn(2, 4100), torch.tensor([1.0, 0.0]), torch.tensor([0.5, float("-inf")]),
                         torch.tensor([1, 2]), torch.tensor([0, 0]))  # in chunks, a floor, a greedy row
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q = torch.randn(1, heads, dim, dtype=torch.bfloat16)  # a split key range: partials and their combine
        keys = torch.randn(1, 32, kv_heads, dim, dtype=torch.bfloat16)
        decode_attention(q, keys, keys, torch.zeros(heads), torch.tensor([32], dtype=torch.int32), None, 0.125,
                         num_splits=2, block_n=16)
        mlp = model.block[0].mlp  # the dequantizing grouped GEMM (Hopper's long prefills), forced
        x = torch.randn(6, config.hidden_size, dtype=torch.bfloat16)
        weights, ids = torch.randn(6, config.num_experts).topk(config.experts_per_token, dim=1)
        moe_triton_from_stores(x, weights.softmax(1).bfloat16(), ids, mlp.mlp1_weight, mlp.mlp1_bias,
                               mlp.mlp2_weight, mlp.mlp2_bias, mlp.swiglu_limit, path="gemm_dense")
        group_pairs(torch.randint(0, 32, (GROUP_ONEHOT // 32 + 1,), dtype=torch.int32), 32)  # chunked: 2 launches
    with open(path, "w") as f:
        json.dump(list(launched.values()), f)


def _jit_function(module: str, name: str):
    """The JITFunction of a kernel (unwrapping an autotuner)."""
    from triton.runtime.autotuner import Autotuner

    obj = getattr(importlib.import_module(module), name)
    return obj.fn if isinstance(obj, Autotuner) else obj


# Constexprs that the interpreter sets its own way: its float32 stand-ins for the MMAs (attention's F32, the MoE
# GEMM's DOT_F32) are off on a GPU.
GPU_CONSTANTS = {"F32": False, "DOT_F32": False}


def _as_gpu_launches(spec: dict) -> list[dict]:
    """The recorded specialization with GPU_CONSTANTS; for the MoE grouped GEMM with bf16 activations also its
    tl.dot_scaled form (SCALED), which the autotuner tries there and the interpreter cannot run."""
    constants = {k: GPU_CONSTANTS.get(k, v) for k, v in spec["constants"].items()}
    out = [{**spec, "constants": constants}]
    activations = spec["signature"].get("x_ptr", spec["signature"].get("act_ptr"))
    if "SCALED" in constants and activations == "*bf16":
        out.append({**spec, "constants": {**constants, "SCALED": True}})
    return out


def build(path: str, archs) -> None:
    """Compiles every specialization recorded in path, as a GPU launches it, for each arch; raises on the first
    failure."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from gptoss.kernels import ARCH_SWITCHES, arch_switch

    with open(path) as f:
        specs = [launch for spec in json.load(f) for launch in _as_gpu_launches(spec)]
    for spec in specs:
        fn = _jit_function(spec["module"], spec["name"])
        constants = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in spec["constants"].items()}
        signature = {**spec["signature"], **{k: "constexpr" for k in constants}}
        for arch in archs:
            for name in ARCH_SWITCHES.keys() & constants.keys():  # PDL, e4m3 conversions: as sm_<arch> launches
                constants[name] = arch_switch(name, arch)
            try:
                compiled = triton_compile(ASTSource(fn, signature, constexprs=constants),
                                          target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": spec["num_warps"], "num_stages": 1})
            except Exception as e:
                raise RuntimeError(f"{spec['name']} for sm_{arch} ({constants}): {e}") from e
            assert compiled.asm["cubin"], spec["name"]
    print(f"{len(specs)} specializations of {len({s['name'] for s in specs})} kernels built for sm_{archs}")


def test_fast_path_kernels_build_before_hopper(tmp_path):
    pytest.importorskip("triton")
    from conftest import run_test_script  # not at import: the build child runs this file without the interpreter

    specs = str(tmp_path / "specs.json")
    run_test_script(__file__, "record", specs, interpret=True)
    with open(specs) as f:
        names = {s["name"] for s in json.load(f)}
    # the kernels of a prefill, a decode step, the paged step, split-K attention, sampling and the dense GEMM
    # were all seen
    assert {"_gemv_kernel", "_mlp1_swiglu_gemv_kernel", "_mlp1_swiglu_dot_kernel", "_rope_cache_kernel",
            "_decode_combine_kernel", "_race_kernel", "_race_final_kernel", "_dequantize_kernel", "_gather_rows_kernel",
            "_swiglu_rows_kernel"} <= names, names
    print(run_test_script(__file__, "build", specs, *map(str, ARCHS)))


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2])
    else:
        build(sys.argv[2], [int(a) for a in sys.argv[3:]])
