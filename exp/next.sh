#!/usr/bin/env bash
# Device calls of this session (H100), logs in $OUT/log, each line prefixed with its step:
#   a: moe_wgmma's GPU tests (words staged in shared memory, now the default prefill GEMM on sm_90), the grouping's;
#      the MoE crossover from 512 to 4,096 tokens; `gptoss bench` for 20b and 120b.
#   b: the GEMM dispatch, `gptoss bench` for 20b, the fast path's accuracy tests, the server at 64, the other MoE GPU
#      tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log() { sed "s|^|$1: |" | tee -a $OUT/log; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/log
if [ "$1" = a ]; then
  timeout 150 python3 -m pytest -q -x tests/test_moe_triton.py -k "wgmma or group_pairs" 2>&1 | tee $OUT/wgmma-tests.log | tail -n 4 | log wgmma-tests
  timeout 140 python3 scripts/moe_crossover.py --sizes 512 768 1024 1536 2048 3072 4096 --no-engine 2>&1 | grep -v -i warn | log crossover
  timeout 100 python3 -m gptoss.cli bench --preset gpt-oss-20b 2>&1 | grep -v -i warn | log bench20
  timeout 160 python3 -m gptoss.cli bench --preset gpt-oss-120b 2>&1 | grep -v -i warn | log bench120
else
  timeout 60 python3 -m pytest -q tests/test_moe_triton.py -k "dispatch" 2>&1 | tail -n 2 | log dispatch-tests
  timeout 100 python3 -m gptoss.cli bench --preset gpt-oss-20b 2>&1 | grep -v -i warn | log bench20
  timeout 140 python3 -m pytest -q -x tests/test_fast_path.py tests/test_decode_step.py 2>&1 | tee $OUT/fast-tests.log | tail -n 4 | log fast-tests
  timeout 140 python3 -m gptoss.cli bench --preset gpt-oss-20b --serve 64 2>&1 | grep -v -i warn | log serve
  timeout 120 python3 -m pytest -q -x tests/test_moe_triton.py -k "not wgmma and not group_pairs and not dispatch" 2>&1 | tee $OUT/moe-tests.log | tail -n 4 | log moe-tests
fi
