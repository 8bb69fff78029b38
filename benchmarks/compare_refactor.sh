#!/usr/bin/env bash
# One device call: the same benchmarks on the code before the architecture refactor and on this
# tree, on one card, one after the other (issue 13's acceptance: within 3 %). OLD is a copy of the
# pre-refactor tree (src/ and benchmarks/, e.g. `git archive ae7acb7 src benchmarks`); diffusers
# wheels in .whl/ if the machine lacks diffusers. Results and logs go to $OUT (or ./out).
#   bash benchmarks/compare_refactor.sh .baseline
set -u
OLD=${1:?usage: compare_refactor.sh OLD_TREE}
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L
run() {  # name, timeout, pythonpath, command...
  local name=$1 limit=$2 path=$3; shift 3
  local t0=$SECONDS
  PYTHONPATH="$SITE$path" timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"
}
run old_attention 150 "$OLD/src" python3 "$OLD/benchmarks/bench_attention.py" --quick --no-flex --calls 5 --json "$OUT/old_attention.json"
run new_attention 150 src python3 benchmarks/bench_attention.py --quick --calls 5 --json "$OUT/new_attention.json"
run old_wan_block 170 "$OLD/src" python3 "$OLD/benchmarks/bench_wan_block.py" --budget-s 100 --out "$OUT/old_wan_block.json"
run new_wan_block 170 src python3 benchmarks/bench_wan_block.py --budget-s 100 --no-train --out "$OUT/new_wan_block.json"
for name in old_attention new_attention old_wan_block new_wan_block; do
  echo "---------------- $name"; tail -n 22 "$OUT/$name.log"
done
