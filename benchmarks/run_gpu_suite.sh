#!/usr/bin/env bash
# One device call on a 4-GPU (or 2-GPU) machine: the diffusers Wan 14B block benchmark on GPU 0,
# then the Ulysses block benchmark on 1, 2 and 4 GPUs. Results and logs go to $OUT (or ./out).
# Usage from the repo root: bash benchmarks/run_gpu_suite.sh [GPU_COUNTS, default 1,2,4]
#                           bash benchmarks/run_gpu_suite.sh --smoke   # both scripts' CPU smoke runs
# On a machine without diffusers, put its wheels in .whl-ulysses/ first (git ignores the folder):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl-ulysses \
#       diffusers==0.42.1 importlib_metadata
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -d .whl-ulysses ]; then  # diffusers as wheels on machines without it
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-ulysses/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
if [ "${1:-}" = "--smoke" ]; then
  WAN_ARGS=(--smoke) ULY_ARGS=(--smoke)
else
  nvidia-smi -L | tee "$OUT/cards.txt"
  # The training step and the compiled blocks start only within --budget-s; the timeout leaves room
  # for the compiled block that started last.
  WAN_ARGS=(--budget-s 200) ULY_ARGS=(--gpus "${1:-1,2,4}" --backend triton --fallback-backend flex)
fi
timeout 300 $PY benchmarks/bench_wan_block.py "${WAN_ARGS[@]}" --out "$OUT/wan_block.json" > "$OUT/wan_block.log" 2>&1
echo "wan_block rc=$?"
timeout 200 $PY benchmarks/bench_ulysses.py "${ULY_ARGS[@]}" --out "$OUT/ulysses.json" > "$OUT/ulysses.log" 2>&1
echo "ulysses rc=$?"
tail -n 40 "$OUT/wan_block.log"; tail -n 25 "$OUT/ulysses.log"
