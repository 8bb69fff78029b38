#!/usr/bin/env bash
# Set up a fresh machine (a local venv, CPU torch pinned so pip never pulls a multi-GB CUDA build)
# and run the whole test suite: the import layering (import-linter), then pytest. CI (.ci/run) runs
# exactly this. GPU-only tests skip here, visibly; scripts/test_gpu.sh runs them on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check triton==3.6.0 -e '.[test,diffusers,demo]'
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"
