"""Do the Triton kernels build for NVIDIA GPUs older than Hopper? Checked without such a GPU (issue point 6).

Runs a prefill, greedy and sampled decode steps and a batched (64-token) MoE call of a random model on this GPU,
collects every Triton and Gluon kernel specialization they compiled (autotune candidates included; the 64-token
call runs the Gluon tensor-core MoE GEMM), and compiles each again for the given architectures as those GPUs would
launch it: with the switches of `gptoss.kernels.ARCH_SWITCHES` set for each (programmatic dependent launch off below
sm_90, the MoE GEMV's e4m3 conversions off below sm_89). A build proves that no sm_90-only instruction is required;
it does not run the kernels.

  python scripts/compile_for_arch.py [--preset gpt-oss-20b] [--arch 80 86 89]
"""

import argparse
import collections
import importlib
import os
import pkgutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

import gptoss.kernels
from gptoss.bench import random_model
from gptoss.generate import TokenGenerator
from gptoss.kernels import ARCH_SWITCHES, arch_switch, moe_triton
from gptoss.kernels.moe import route


def jit_functions():
    """Every JITFunction reachable from the globals of gptoss.kernels' modules: directly, through an autotuner, or
    in a dict of lazily built autotuners (moe_gemv's, moe_gemm_triton's). Modules whose kernels serve sm_90 only
    (HOPPER_ONLY: moe_wgmma; other GPUs run the Triton GEMM in their place) are left out."""
    modules = [importlib.import_module(f"gptoss.kernels.{m.name}")
               for m in pkgutil.iter_modules(gptoss.kernels.__path__)]
    modules = [m for m in modules if not getattr(m, "HOPPER_ONLY", False)]
    seen = {}
    stack = [v for m in modules for v in vars(m).values()]
    while stack:
        obj = stack.pop()
        if hasattr(obj, "device_caches"):
            seen[id(obj)] = obj
        elif hasattr(obj, "fn") and hasattr(obj, "configs"):  # triton.autotune's Autotuner
            stack.append(obj.fn)
        elif isinstance(obj, dict):
            stack += list(obj.values())
    return list(seen.values())


def compiled_kernels(device):
    out = []
    for fn in jit_functions():
        if device in fn.device_caches:
            out += list(fn.device_caches[device][0].values())
    return out


def exercise(preset):
    model = random_model(preset, "cuda")
    generator = TokenGenerator(None, "cuda", context_length=1024, model=model)
    prompt = torch.randint(0, 199998, (300,)).tolist()
    with torch.inference_mode():
        list(generator.generate(prompt, (), temperature=0.0, max_tokens=4))
        list(generator.generate(prompt, (), temperature=1.0, max_tokens=4))
        mlp = model.block[0].mlp
        x = torch.randn(64, model.config.hidden_size, device="cuda").bfloat16()
        weights, ids = route(torch.randn(64, model.config.num_experts, device="cuda"), model.config.experts_per_token)
        moe_triton.moe_triton_from_stores(x, weights.bfloat16(), ids, mlp.mlp1_weight, mlp.mlp1_bias, mlp.mlp2_weight,
                                          mlp.mlp2_bias, mlp.swiglu_limit)
    torch.cuda.synchronize()


def for_older_gpu(src, arch):
    """The same specialization as a GPU of sm_<arch> launches it: its arch switches (PDL, the e4m3 conversions of
    gptoss.kernels.ARCH_SWITCHES) set for that arch (kernels without them, the Gluon ones among them, as they are)."""
    switches = ARCH_SWITCHES.keys() & set(src.fn.arg_names)
    if not switches:
        return src
    constants = dict(src.constants)
    for name in switches:
        constants[(src.fn.arg_names.index(name),)] = arch_switch(name, arch)
    return ASTSource(src.fn, src.signature, constants, src.attrs)


def build(kernel, arch):
    """None, or why `kernel` does not build for sm_<arch>."""
    options = {"num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages}
    try:
        triton_compile(for_older_gpu(kernel.src, arch), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # every failure is reported, then the run fails
        return (f"{kernel.src.fn.__name__} (warps {options['num_warps']}, stages {options['num_stages']}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("compile_for_arch.py: needs a CUDA GPU (it compiles what a run on one builds)")
    exercise(args.preset)
    kernels = compiled_kernels(torch.cuda.current_device())
    names = collections.Counter(k.src.fn.__name__ for k in kernels)
    print(f"{len(kernels)} specializations of {len(names)} kernels compiled on {torch.cuda.get_device_name()}: "
          + ", ".join(f"{n} x{c}" for n, c in sorted(names.items())), flush=True)
    failures = 0
    for arch in args.arch:
        t0 = time.time()
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # ptxas runs as a subprocess: builds overlap
            failed = [f for f in pool.map(lambda k: build(k, arch), kernels) if f]
        print(f"sm_{arch}: {len(kernels) - len(failed)} of {len(kernels)} built ({time.time() - t0:.0f} s)",
              flush=True)
        for line in failed:
            print(f"  FAILED {line}")
        failures += len(failed)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
