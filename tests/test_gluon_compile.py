"""The warp-specialised Gluon forward builds for Hopper (sm_90a) without register spills, on any
machine: CI has no GPU, so without this a Gluon error or a spill would surface only on the device.
The build runs in a process of its own (tests/gluon_compile.py: a stand-in driver, the bundled
ptxas); what the kernels compute is tested on the GPU (scripts/test_gpu.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gluon_compile.py")


def test_gluon_forward_builds_for_sm90_without_spills() -> None:
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from nabla_attn.kernels.attention_ws import gluon_validated

    if not gluon_validated():
        pytest.skip(f"the Gluon kernels are written for Triton 3.6, this is {triton.__version__}")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "8 Gluon builds for sm_90a, 0 with spills" in r.stdout, r.stdout
