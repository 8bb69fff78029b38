#!/usr/bin/env bash
# One device call: calibrate the step time, train for a fixed wall budget, compare dense vs NABLA
# training steps, then run the quality study and the demo at the large size on the trained weights.
# Usage (repo root, wheels in .whl_demo/, data in .data/): bash training/gpu_run.sh OUTDIR TRAIN_SECONDS
set -u
OUT=${1:?out dir}; BUDGET=${2:-200}
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"
python3 training/train.py --out /tmp/cal --steps 12 --log-every 4 --warmup 2 2>&1 | tail -3 | tee -a "$LOG"
ST=$(python3 -c "import json;print(json.load(open('/tmp/cal/train_log_dense.json'))['median_step_s'])") || exit 3
N=$(python3 -c "print(max(100, int($BUDGET / $ST)))")
echo "calibrated step ${ST}s -> --steps $N" | tee -a "$LOG"
python3 training/train.py --out /tmp/run --steps "$N" --minutes "$(python3 -c "print($BUDGET / 60 + 0.3)")" --log-every 100 2>&1 | tee -a "$LOG"
cp /tmp/run/tiny_wan_video.safetensors /tmp/run/tiny_wan_video.json /tmp/run/train_log_dense.json "$OUT"/ || exit 4
W=/tmp/run/tiny_wan_video.safetensors
timeout 110 python3 benchmarks/quality_study.py --weights $W --size large --steps 16 --device cuda --out "$OUT"/quality_large.json 2>&1 | tail -45 | tee -a "$LOG"
timeout 60 python3 -m nabla_attn.cli demo --weights $W --size large --device cuda --out /tmp/demo --no-progress 2>&1 | tee -a "$LOG"
cp /tmp/demo/summary.json "$OUT"/demo_large_summary.json; cp /tmp/demo/block_masks.png "$OUT"/block_masks_large.png
timeout 30 python3 training/train.py --out /tmp/cmpd --only-large --steps 20 --log-every 5 --warmup 5 2>&1 | tail -5 | tee -a "$LOG"
timeout 50 python3 training/train.py --out /tmp/cmpn --only-large --steps 20 --log-every 5 --warmup 5 --attention nabla 2>&1 | tail -7 | tee -a "$LOG"
python3 -c "
import json;a=json.load(open('/tmp/cmpd/train_log_dense.json'));b=json.load(open('/tmp/cmpn/train_log_nabla.json'))
json.dump({'dense':a,'nabla':b},open('$OUT/train_compare.json','w'),indent=1)" || true
