#!/usr/bin/env bash
# Two device calls for the three experiments of branch exp-next-three (H100 or H200; part a ~6 minutes on a cold
# machine, part b ~4 on a warm one):
#  1. group-chunked (on by default here): the grouping's GPU tests, then the 1k prefill's kernels and `gptoss bench`
#     here and on main (a worktree of main at .exptree/base: `git worktree add --detach .exptree/base main`, and
#     carry: [".exptree"]);
#  2. exp-gemv-e4m3 (GPTOSS_EXP_FP8CVT=1): the MoE GEMV's tests with it, exp/gemv_e4m3_ab.py, the decode replay both
#     ways;
#  3. exp-wgmma-wsmem (GPTOSS_EXP_WSMEM=1, GPTOSS_EXP_WAHEAD=2|3): moe_wgmma's tests with it, exp/wgmma_wsmem_ab.py.
# Each part's lines in $OUT/log start with its name.   OUT=$OUT bash exp/next.sh a; then OUT=$OUT bash exp/next.sh b
export PYTHONUNBUFFERED=1
log() { sed "s|^|$1: |" | tee -a $OUT/log; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/log
export PYTHONPATH=$PWD
if [ "$1" = a ]; then
timeout 100 python3 -m pytest -q -x tests/test_moe_triton.py -k "group_pairs or real_shapes or skewed or dense" 2>&1 | tail -n 1 | log group-tests
GPTOSS_EXP_FP8CVT=1 timeout 100 python3 -m pytest -q -x tests/test_moe_triton.py -k "gemv or small_shapes or decode_sizes or residual" 2>&1 | tail -n 1 | log e4m3-tests
timeout 100 python3 exp/gemv_e4m3_ab.py 2>&1 | grep -v -i warn | log e4m3-ab
for v in 0 1 0 1; do
  GPTOSS_EXP_FP8CVT=$v timeout 45 python3 scripts/profile_decode.py 2>&1 | grep "graph replay" | log "e4m3-replay $v"
done
for tree in . .exptree/base; do
  (cd $tree && PYTHONPATH=$PWD timeout 60 python3 scripts/profile_decode.py 2>&1 | sed -n '/prefill of/,$p' | head -20 | log "group-prefill $tree")
  (cd $tree && PYTHONPATH=$PWD timeout 100 python3 -m gptoss.cli bench --preset gpt-oss-20b 2>&1 | grep "^gptoss" | log "group-bench $tree")
done
else
for ahead in 2 3; do
  GPTOSS_EXP_WSMEM=1 GPTOSS_EXP_WAHEAD=$ahead timeout 120 python3 -m pytest -q -x tests/test_moe_triton.py -k "wgmma" 2>&1 | tail -n 1 | log "wgmma-tests ahead $ahead"
done
timeout 200 python3 exp/wgmma_wsmem_ab.py 1024 8192 2>&1 | grep -v -i warn | log wgmma-ab
fi
