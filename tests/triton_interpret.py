"""Run Triton kernels on the CPU through Triton's interpreter, for the kernel test modules.

The interpreter works only if ``TRITON_INTERPRET=1`` is set before Triton is first imported in the
process (Triton defines its library functions at import). Importing this module sets it when it
still can; when something imported Triton earlier, ``IN_PROCESS`` is False and a test module re-runs
itself in a fresh process through :func:`rerun_in_fresh_process`, skipping its tests here. The
parent then fails unless the child ran every test it collected: a child whose tests all skipped
would otherwise pass without having checked anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

FRESH_PROCESS_TEST = "test_in_fresh_process_when_triton_was_imported_first"
# What each fresh-process child ran, printed in pytest's terminal summary (tests/conftest.py).
CHILD_COUNTS: dict[str, dict[str, int]] = {}
ON_CPU = not torch.cuda.is_available()
IN_PROCESS = True
if ON_CPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        IN_PROCESS = False
    else:
        os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if ON_CPU else "cuda"


if ON_CPU and IN_PROCESS:
    from nabla_attn.kernels.interpreter import patch_scalars

    patch_scalars()


def child_counts(output: str) -> dict[str, int]:
    """The counts of pytest's summary line (``3 passed, 1 skipped in 2.0s`` -> {passed: 3, skipped: 1})."""
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    if not lines:
        return {}
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])}


def rerun_in_fresh_process(test_file: str, allowed_skips: int = 0) -> None:
    """Body of a module's fresh-process test: run the module's tests in a new interpreter process.

    Fails when the child fails, runs no test, or skips more than ``allowed_skips`` tests besides
    this one, and prints the child's counts either way."""
    if IN_PROCESS:
        pytest.skip("running in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test_file],
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    counts = child_counts(r.stdout)
    CHILD_COUNTS[os.path.basename(test_file)] = counts
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert counts.get("passed", 0) > 0, f"the child ran no test: {counts}\n{r.stdout[-2000:]}"
    # The child skips its own copy of this test ("running in this process").
    assert counts.get("skipped", 0) <= allowed_skips + 1, f"the child skipped tests: {counts}\n{r.stdout[-2000:]}"


@pytest.fixture(autouse=True)
def only_in_process(request: pytest.FixtureRequest) -> None:
    """Autouse in the kernel test modules: their tests run here only where the interpreter is on."""
    if not IN_PROCESS and request.node.name != FRESH_PROCESS_TEST:
        pytest.skip(f"runs in a fresh process (see {FRESH_PROCESS_TEST})")
