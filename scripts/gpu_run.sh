#!/usr/bin/env bash
# The GPU check run on the device machine: GPU tests, then the benchmarks recorded in the README.
# Usage: bash scripts/gpu_run.sh [all-tests|tests|kernel-tests|moe-bench|linear-bench|profile|profile-prefill|profile-engine|bench20|bench120|serve|finetune|archs]...   (logs under $OUT, default ./out)
# all-tests: every GPU test file in three pytest processes side by side, so that Triton's compiling and autotuning
# overlap (H100, with compile_for_arch.py alongside: the model and other groups ~4 min each, test_moe_triton.py over
# 6; run it with a limit of 8 min or more). For correctness only: kernels tuned side by side may pick other tiles.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    all-tests)
      python3 -m pytest -q -rfE tests/test_moe_triton.py >"$OUT/tests-moe.log" 2>&1 &
      python3 -m pytest -q -rfE tests/test_fast_path.py tests/test_decode_step.py >"$OUT/tests-model.log" 2>&1 &
      python3 -m pytest -q -rfE tests/test_attention_triton.py tests/test_dense_triton.py tests/test_sample_triton.py \
        tests/test_engine.py >"$OUT/tests-other.log" 2>&1 &
      wait
      for f in moe model other; do echo "tests-$f: $(tail -n 1 "$OUT/tests-$f.log")"; done ;;
    tests) python3 -m pytest -q -s tests/test_fast_path.py 2>&1 | tee "$OUT/tests.log" | tail -n 25 ;;
    kernel-tests) python3 -m pytest -q tests/test_attention_triton.py tests/test_moe_triton.py \
             tests/test_dense_triton.py tests/test_decode_step.py 2>&1 | tee "$OUT/kernel-tests.log" | tail -n 5 ;;
    moe-bench) python3 scripts/bench_moe.py 2>&1 | tee "$OUT/moe-bench.log" | tail -n 30 ;;
    linear-bench) python3 scripts/bench_linear.py 2>&1 | tee "$OUT/linear-bench.log" | tail -n 30 ;;
    profile) python3 scripts/profile_decode.py 2>&1 | tee "$OUT/profile.log" | tail -n 40 ;;
    profile-prefill) python3 scripts/profile_prefill.py 2>&1 | tee "$OUT/profile-prefill.log" | tail -n 40 ;;
    profile-engine) python3 scripts/profile_engine_step.py 2>&1 | tee "$OUT/profile-engine.log" | tail -n 30 ;;
    bench20) python3 -m gptoss.cli bench --preset gpt-oss-20b --compare hf --json "$OUT/bench20.json" \
             2>&1 | tee "$OUT/bench20.log" ;;
    bench120) python3 -m gptoss.cli bench --preset gpt-oss-120b --json "$OUT/bench120.json" \
             2>&1 | tee "$OUT/bench120.log" ;;
    serve) python3 -m gptoss.cli bench --preset gpt-oss-20b --serve 64 2>&1 | tee "$OUT/serve.log" ;;
    finetune) python3 scripts/finetune_speed.py 2>&1 | tee "$OUT/finetune.log" | tail -n 5 ;;
    archs) python3 scripts/compile_for_arch.py --arch 80 86 89 2>&1 | tee "$OUT/archs.log" | tail -n 5 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
