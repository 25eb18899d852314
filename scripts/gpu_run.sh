#!/usr/bin/env bash
# The GPU check run on the device machine: GPU tests, then the benchmarks recorded in the README.
# Usage: bash scripts/gpu_run.sh [tests|kernel-tests|moe-bench|linear-bench|profile|profile-engine|bench20|bench120|serve|finetune|archs]...   (logs under $OUT, default ./out)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -s tests/test_fast_path.py 2>&1 | tee "$OUT/tests.log" | tail -n 25 ;;
    kernel-tests) python3 -m pytest -q tests/test_attention_triton.py tests/test_moe_triton.py \
             tests/test_dense_triton.py tests/test_decode_step.py 2>&1 | tee "$OUT/kernel-tests.log" | tail -n 5 ;;
    moe-bench) python3 scripts/bench_moe.py 2>&1 | tee "$OUT/moe-bench.log" | tail -n 30 ;;
    linear-bench) python3 scripts/bench_linear.py 2>&1 | tee "$OUT/linear-bench.log" | tail -n 30 ;;
    profile) python3 scripts/profile_decode.py 2>&1 | tee "$OUT/profile.log" | tail -n 40 ;;
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
