"""Run Triton kernels on the CPU through Triton's interpreter, for the kernel test modules.

The interpreter works only if ``TRITON_INTERPRET=1`` is set before Triton is first imported in the
process (Triton defines its library functions at import). Importing this module sets it when it
still can; when something imported Triton earlier, ``IN_PROCESS`` is False and a test module re-runs
itself in a fresh process through :func:`rerun_in_fresh_process`, skipping its tests here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

FRESH_PROCESS_TEST = "test_in_fresh_process_when_triton_was_imported_first"
ON_CPU = not torch.cuda.is_available()
IN_PROCESS = True
if ON_CPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        IN_PROCESS = False
    else:
        os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if ON_CPU else "cuda"


def rerun_in_fresh_process(test_file: str) -> None:
    """Body of a module's fresh-process test: run the module's tests in a new interpreter process."""
    if IN_PROCESS:
        pytest.skip("running in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.fixture(autouse=True)
def only_in_process(request: pytest.FixtureRequest) -> None:
    """Autouse in the kernel test modules: their tests run here only where the interpreter is on."""
    if not IN_PROCESS and request.node.name != FRESH_PROCESS_TEST:
        pytest.skip(f"runs in a fresh process (see {FRESH_PROCESS_TEST})")
