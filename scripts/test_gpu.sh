#!/usr/bin/env bash
# The GPU test command: every GPU-only test (tests/gpu/: the Gluon forward, bf16 under the
# flash-attention rule, the fused mask against the definition at full size, flex on CUDA,
# torch.compile through the custom ops, a batch past 2^31 elements) and the kernel test modules,
# which run on the GPU when one is present. Run it on a CUDA machine from the repo root; it uses the
# machine's own torch and Triton and runs the project from source. The last line is the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
# diffusers and other pure-Python wheels carried in .whl/ (a GPU image without them); none: those
# tests skip, visibly.
SITE=
[ -d .whl ] && source benchmarks/device_env.sh
export PYTHONPATH="${SITE}src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print('GPU tests on', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" \
  | tee "$OUT/gpu_tests.log"
python3 -m pytest -q -rs -p no:cacheprovider --timeout 900 \
  tests/gpu tests/test_triton_kernel.py tests/test_fast_mask.py tests/test_permute.py tests/test_attention.py tests/test_fp8.py "$@" \
  2>&1 | tee -a "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "GPU test summary: $(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -n 1)"
exit "$status"
