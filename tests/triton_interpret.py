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
ON_CPU = not torch.cuda.is_available()
IN_PROCESS = True
if ON_CPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        IN_PROCESS = False
    else:
        os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if ON_CPU else "cuda"


def _patch_interpreter_scalars() -> None:
    """Let Triton 3.6's interpreter use loaded scalars as ``range`` bounds under numpy >= 2.3.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
    newer numpy rejects ("only 0-dimensional arrays can be converted"), so ``for j in range(cnt)``
    with a loaded ``cnt`` fails there (compiled Triton is unaffected).
    """
    try:
        from triton import knobs
        from triton.runtime import interpreter
    except ImportError:  # no Triton: nothing to patch
        return
    if not knobs.runtime.interpret or getattr(interpreter, "_nabla_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._nabla_patched = True


if ON_CPU and IN_PROCESS:
    _patch_interpreter_scalars()


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
    print(f"{os.path.basename(test_file)} in a fresh process: {counts}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert counts.get("passed", 0) > 0, f"the child ran no test: {counts}\n{r.stdout[-2000:]}"
    # The child skips its own copy of this test ("running in this process").
    assert counts.get("skipped", 0) <= allowed_skips + 1, f"the child skipped tests: {counts}\n{r.stdout[-2000:]}"


@pytest.fixture(autouse=True)
def only_in_process(request: pytest.FixtureRequest) -> None:
    """Autouse in the kernel test modules: their tests run here only where the interpreter is on."""
    if not IN_PROCESS and request.node.name != FRESH_PROCESS_TEST:
        pytest.skip(f"runs in a fresh process (see {FRESH_PROCESS_TEST})")
