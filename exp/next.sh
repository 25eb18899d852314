#!/usr/bin/env bash
# Device calls of branch exp-next-three (H100 or H200), logs in $OUT/log, each line prefixed with its step:
#   OUT=$OUT bash exp/next.sh a: moe_wgmma with its words staged in shared memory (GPTOSS_EXP_WSMEM=1,
#     GPTOSS_EXP_WAHEAD=2|3) against the shipped form and the Triton GEMM; the MoE kernels' GPU tests (the chunked
#     grouping, the GEMV's e4m3 decode); `gptoss bench` for 20b.
#   OUT=$OUT bash exp/next.sh b: the fast path's accuracy tests, `gptoss bench` for 120b and the server at 64.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log() { sed "s|^|$1: |" | tee -a $OUT/log; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/log
if [ "$1" = a ]; then
  timeout 170 python3 exp/wgmma_wsmem_ab.py 1024 8192 2>&1 | grep -v -i warn | log wgmma-ab
  timeout 110 python3 -m gptoss.cli bench --preset gpt-oss-20b 2>&1 | grep -v -i warn | log bench20
  timeout 200 python3 -m pytest -q -x tests/test_moe_triton.py 2>&1 | tee $OUT/moe-tests.log | tail -n 4 | log moe-tests
else
  timeout 120 python3 -m pytest -q -x tests/test_fast_path.py tests/test_decode_step.py 2>&1 | tee $OUT/fast-tests.log | tail -n 4 | log fast-tests
  timeout 200 python3 -m gptoss.cli bench --preset gpt-oss-120b 2>&1 | grep -v -i warn | log bench120
  timeout 200 python3 -m gptoss.cli bench --preset gpt-oss-20b --serve 64 2>&1 | grep -v -i warn | log serve
fi
