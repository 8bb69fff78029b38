#!/usr/bin/env bash
# The quality study with fine-tuning, on a GPU (issue 17): every method at a kept fraction near
# the target, without and with fine-tuning under that same mask (training/finetune.py, distilled
# from the dense model), evaluated by benchmarks/quality_study.py against dense from the same noise.
#
#   OUT=runs/ft bash benchmarks/finetune_study.sh sweep      # untuned: thresholds, STA windows, random, calibrated
#   OUT=runs/ft bash benchmarks/finetune_study.sh 20 30 10   # fine-tune and evaluate the methods at these targets
#
# Writes $OUT/quality_<stage>.json (quality_study's format: merge them with --append or by hand),
# $OUT/finetune_logs.json (every run's log) and the fine-tuned weights of the calibrated runs as
# $OUT/ft_calibrated_<target>.safetensors (KEEP_WEIGHTS=0 keeps none).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-runs/finetune_study}
CAL=benchmarks/results/calibration
STEPS=${STEPS:-1000}      # fine-tune steps (at most; MINUTES stops a run earlier)
MINUTES=${MINUTES:-0.35}
LR=${LR:-}                # empty: chosen by a short sweep on the calibrated 20% run
WORK=$(mktemp -d)
mkdir -p "$OUT"

study() {  # study NAME RUNS...
  local name=$1; shift
  python3 benchmarks/quality_study.py --device cuda --out "$OUT/quality_$name.json" "$@" 2>&1 | grep -v "^|"
}

finetune() {  # finetune TAG POLICY LR
  python3 training/finetune.py --mask "$2" --steps "$STEPS" --minutes "$MINUTES" --batch 6 --lr "$3" --warmup 20 \
    --log-every 100 --out "$WORK/$1" > "$WORK/$1.log" 2>&1 || { echo "fine-tune $1 failed:"; tail -5 "$WORK/$1.log"; }
  tail -1 "$WORK/$1.log"
}

# Policies per target kept fraction: calibrated (per-head thresholds from `nabla calibrate`), the
# best STA window near the target, one global NABLA threshold, NABLA+STA, random blocks.
declare -A POLICIES=(
  [10]="calibrated:$CAL/small_10.json sta:3,5,1 nabla:0.3 nabla+sta:0.1:1,3,3 random:0.1"
  [20]="calibrated:$CAL/small_20.json sta:9,5,1 nabla:0.5 nabla+sta:0.3:1,3,3 random:0.2"
  [30]="calibrated:$CAL/small_30.json sta:5,3,3 nabla:0.7 nabla+sta:0.5:1,3,3 random:0.3"
)

for stage in "$@"; do
  if [ "$stage" = sweep ]; then
    study sweep --thresholds 0.2,0.3,0.5,0.7,0.85,0.95 --methods nabla,sta,nabla+sta,random \
      --sta-windows "1,3,3;3,3,1;3,1,3;3,5,1;5,3,1;5,1,3;9,3,1;9,1,3;3,3,3;9,5,1;5,1,5;5,3,3;9,1,7;7,3,3;5,3,5"
    study sweep --append --runs "calibrated:$CAL/small_10.json;calibrated:$CAL/small_20.json;calibrated:$CAL/small_30.json"
    continue
  fi
  if [ -z "$LR" ]; then  # pick the learning rate on the calibrated 20% run by the validation loss
    for lr in 3e-5 1e-4 3e-4; do finetune "lr$lr" "calibrated:$CAL/small_20.json" $lr; done
    LR=$(python3 - "$WORK" <<'EOF'
import json, sys, pathlib
logs = {p.parent.name[2:]: json.loads(p.read_text())["log"][-1]["val_loss"] for p in pathlib.Path(sys.argv[1]).glob("lr*/finetune_log.json")}
print(min(logs, key=logs.get) if logs else "1e-4")
EOF
)
    echo "learning rate: $LR"
  fi
  runs=""
  for pol in ${POLICIES[$stage]}; do
    tag="${pol%%:*}_$stage"; tag=${tag//+/_}
    if [ -f "$WORK/lr$LR/tiny_wan_video.safetensors" ] && [ "$pol" = "calibrated:$CAL/small_20.json" ]; then
      cp -r "$WORK/lr$LR" "$WORK/$tag"; echo "$tag: the sweep's run"
    else
      finetune "$tag" "$pol" "$LR"
    fi
    [ -f "$WORK/$tag/tiny_wan_video.safetensors" ] && runs="$runs;$pol@$WORK/$tag/tiny_wan_video.safetensors"
  done
  study "ft$stage" --runs "${runs#;}"
  if [ "${KEEP_WEIGHTS:-1}" = 1 ] && [ -f "$WORK/calibrated_$stage/tiny_wan_video.safetensors" ]; then
    cp "$WORK/calibrated_$stage/tiny_wan_video.safetensors" "$OUT/ft_calibrated_$stage.safetensors"
  fi
done

python3 - "$WORK" "$OUT/finetune_logs.json" <<'EOF'
import json, sys, pathlib
logs = {p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*/finetune_log.json"))}
old = json.loads(pathlib.Path(sys.argv[2]).read_text()) if pathlib.Path(sys.argv[2]).exists() else {}
pathlib.Path(sys.argv[2]).write_text(json.dumps({**old, **logs}, indent=1))
for name, log in logs.items():
    print(f"{name:24s} steps {log['steps']:5d}  val loss {log['log'][0].get('val_loss', float('nan')):.4f} -> "
          f"{log['log'][-1].get('val_loss', float('nan')):.4f}  median step {log['median_step_s']:.3f}s")
EOF
