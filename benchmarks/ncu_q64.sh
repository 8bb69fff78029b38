#!/usr/bin/env bash
# Nsight Compute on the forwards of benchmarks/q64_diagnostic.py (H200; needs a machine whose runtime
# lets ncu read the counters). Launch order of --profile: the real 64-row table twice, the
# equal-lists case twice (union kernel), the same lists as a 128-row table twice (128-row kernel).
#
# Default: every Gluon launch after the first: throughput, issue activity, instruction counts and
# the top warp stall reason. Output: $OUT/ncu_q64.txt. (The per-opcode metric prints its total only.)
#
# NCU_FULL=1: the second equal-lists launch and both 128-row launches (the same work on the two
# kernels) with the full section set, every warp stall reason as a per-issue ratio, and source-level
# sampling. Output: $OUT/ncu_q64_full.txt (every section's details) and $OUT/ncu_q64_sass.csv (per
# SASS instruction: samples by stall reason, instructions executed; the launches one after another).
set -u
OUT=${OUT:-.}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${NCU_FULL:-0}" = 1 ]; then
  rep=/tmp/ncu_q64_full
  ncu --clock-control none --kernel-name regex:'_attn_fwd_(union|ws)' --launch-skip 3 --launch-skip-before-match 0 \
      --launch-count 3 --set full --import-source no \
      --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      -f -o "$rep" python benchmarks/q64_diagnostic.py --profile > "$OUT/ncu_q64_full_run.txt" 2>&1
  echo "ncu rc=$?"
  ncu -i "$rep.ncu-rep" --page details --print-details all > "$OUT/ncu_q64_full.txt" 2>&1
  echo "details rc=$? ($(wc -l < "$OUT/ncu_q64_full.txt") lines)"
  ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_q64_sass.csv" 2>&1
  echo "source rc=$? ($(wc -l < "$OUT/ncu_q64_sass.csv") lines)"
  exit 0
fi
ncu --clock-control none --kernel-name regex:'_attn_fwd_(union|ws)' --launch-skip 1 --launch-skip-before-match 0 \
    --launch-count ${NCU_COUNT:-6} --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
    --metrics sass__inst_executed_per_opcode \
    python benchmarks/q64_diagnostic.py --profile > "$OUT/ncu_q64.txt" 2>&1
echo "ncu rc=$? ($(wc -l < "$OUT/ncu_q64.txt") lines)"
