"""CPU smoke runs of the GPU benchmarks: Triton's interpreter for our kernels, at toy sizes.

Import this module and call :func:`setup` before anything imports Triton: the interpreter is chosen
when Triton is first imported (``TRITON_INTERPRET=1``). Timings from a smoke run mean nothing; the
point is that every code path up to the CUDA-only calls runs once, so a device run does not die on
a typo. The Gluon (warp-specialised) forward has no interpreter: on the CPU the library runs the
Triton kernel in its place (``ws_eligible`` is false off sm_90).
"""

from __future__ import annotations

import os
import sys


def requested(argv: list[str] | None = None) -> bool:
    """Whether the command line asks for a smoke run (read before argparse, so before Triton loads)."""
    return "--smoke" in (sys.argv[1:] if argv is None else argv)


def setup(argv: list[str] | None = None) -> bool:
    """For a smoke run: switch Triton's interpreter on and patch it; returns whether it is on."""
    if not requested(argv):
        return False
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("cpu_smoke: Triton was imported before setup(); set TRITON_INTERPRET=1 in the environment",
              file=sys.stderr)
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    from nabla_attn.kernels.interpreter import patch_scalars

    return patch_scalars()
