#!/usr/bin/env bash
# One device call for the committed single-GPU results: the attention sweep at Wan 14B 720p (public
# op and kernel columns, both query blocks, densities and equal thresholds, flex beside), the
# Kandinsky 5 Pro 720p comparison with diffusers' own NABLA path, and the Wan 14B block's training
# step. diffusers wheels in .whl/ if the machine lacks diffusers. Results go to $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_env.sh"
export PYTHONPATH="${SITE}src"
run attention ${ATTN_S:-250} python3 benchmarks/bench_attention.py --shapes wan14b_720p --calls 10 --json "$OUT/attention_h200.json"
run kandinsky ${K5_S:-200} python3 benchmarks/bench_kandinsky.py --eager-only --out "$OUT/kandinsky_h200.json"
run wan_block ${WAN_S:-200} python3 benchmarks/bench_wan_block.py --budget-s 150 --out "$OUT/wan_block_h200.json"
run wan_block_q64 ${WAN_S:-200} python3 benchmarks/bench_wan_block.py --query-block 64 --budget-s 150 --out "$OUT/wan_block_q64_h200.json"
for name in attention kandinsky wan_block wan_block_q64; do
  echo "---------------- $name"; tail -n 30 "$OUT/$name.log"
done
