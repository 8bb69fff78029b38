#!/usr/bin/env bash
# One device call for issue 18's results on an H200: the fp8 benchmark at Wan 14B 720p (public op
# and kernels, both query blocks, accuracy against float64), the bundled model sampled with fp8
# NABLA against 16-bit NABLA (with per-layer errors of the q, k, v it captures), and the diffusers
# Wan 14B block with fp8 NABLA, eager and compiled. diffusers wheels in .whl/ if the machine lacks
# diffusers. Results go to $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_env.sh"
export PYTHONPATH="${SITE}src"
run fp8_h200 120 python3 benchmarks/bench_fp8.py --out "$OUT/fp8_h200.json" --budget-s 100 --reps 5
run fp8_model_quality_h200 150 python3 benchmarks/fp8_model_quality.py --cuda --out "$OUT/fp8_model_quality_h200.json"
run wan_block_fp8_h200 270 python3 benchmarks/bench_wan_block.py --precision fp8 --query-block 64 --no-train \
  --budget-s 240 --out "$OUT/wan_block_fp8_h200.json"
for name in fp8_h200 fp8_model_quality_h200 wan_block_fp8_h200; do
  echo "---------------- $name"; tail -n 25 "$OUT/$name.log"
done
