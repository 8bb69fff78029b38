#!/usr/bin/env bash
# Nsight Compute on the forwards of benchmarks/q64_diagnostic.py (H200; needs a machine whose runtime
# lets ncu read the counters): every Gluon launch after the first (the real 64-row table's second,
# both of the equal-lists case, both of the 128-row case): throughput, issue activity, instruction
# counts and the top warp stall reason. Output: $OUT/ncu_q64.txt. (The per-opcode metric prints its
# total only.)
set -u
OUT=${OUT:-.}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
ncu --clock-control none --kernel-name regex:'_attn_fwd_(union|ws)' --launch-skip 1 --launch-skip-before-match 0 \
    --launch-count ${NCU_COUNT:-6} --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
    --metrics sass__inst_executed_per_opcode \
    python benchmarks/q64_diagnostic.py --profile > "$OUT/ncu_q64.txt" 2>&1
echo "ncu rc=$? ($(wc -l < "$OUT/ncu_q64.txt") lines)"
