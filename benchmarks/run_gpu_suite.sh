#!/usr/bin/env bash
# One device call on a 4-GPU (or 2-GPU) machine: the diffusers Wan 14B block benchmark on GPU 0,
# then the Ulysses block benchmark on 1, 2 and 4 GPUs. Results and logs go to $OUT (or ./out).
# Usage from the repo root: bash benchmarks/run_gpu_suite.sh [GPU_COUNTS, default 1,2,4]
# On a machine without diffusers, put its wheels in .whl-ulysses/ first (git ignores the folder):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl-ulysses \
#       diffusers==0.42.1 importlib_metadata
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -d .whl-ulysses ]; then  # diffusers as wheels on machines without it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-ulysses/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
nvidia-smi -L | tee "$OUT/cards.txt"
timeout 170 python3 benchmarks/bench_wan_block.py --budget-s 110 --out "$OUT/wan_block.json" > "$OUT/wan_block.log" 2>&1
echo "wan_block rc=$?"
timeout 200 python3 benchmarks/bench_ulysses.py --gpus "${1:-1,2,4}" --backend triton --fallback-backend flex \
  --out "$OUT/ulysses.json" > "$OUT/ulysses.log" 2>&1
echo "ulysses rc=$?"
tail -n 25 "$OUT/wan_block.log"; tail -n 25 "$OUT/ulysses.log"
