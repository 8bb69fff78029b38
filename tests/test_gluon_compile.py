"""The kernels a Hopper card runs build for sm_90a on any machine: the warp-specialised Gluon forward
without register spills, and every build (Gluon and Triton) without wgmma descriptors read from
registers that are not written on every path. CI has no GPU, so without this a Gluon error, a spill
or that ptxas miscompile would surface only on the device. The builds run in a process of their own
(tests/gluon_compile.py: a stand-in driver, the bundled ptxas and nvdisasm); what the kernels
compute is tested on the GPU (scripts/test_gpu.sh)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gluon_compile.py")
# nvdisasm -c of the 64-row union kernel (head_dim 64, padded blocks) built by ptxas 12.8 from the
# two-block kernel at commit 628d1da (branch wip/q64-two-block): on an H200 its rows that took the
# serial branch came out wrong (docs/kernel-notes.md, v33).
MISCOMPILED = Path(__file__).parent / "data" / "ptxas12.8_miscompiled_union_hd64_padded.sass.gz"


def _script():  # noqa: ANN202 - the module object of tests/gluon_compile.py
    if "gluon_compile" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gluon_compile", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gluon_compile"] = module  # its dataclass looks its module up there
        spec.loader.exec_module(module)
    return sys.modules["gluon_compile"]


def test_hopper_builds_without_spills_or_undefined_descriptors() -> None:
    """The 12 Gluon forward builds (tiled and natural-order output) without spills or serialised
    wgmma; all 28 Hopper builds (Gluon and Triton kernels) without wgmma descriptors read from
    registers not written on every path."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from nabla_attn.kernels.attention_ws import gluon_validated

    if not gluon_validated():
        pytest.skip(f"the Gluon kernels are written for Triton 3.6, this is {triton.__version__}")
    if not _script().bundled("ptxas").exists():
        pytest.skip("this Triton build bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "12 Gluon builds for sm_90a, 0 with spills, 0 with serialised wgmma" in r.stdout, r.stdout
    assert "28 builds for sm_90a, 0 with undefined descriptors" in r.stdout, r.stdout


def test_descriptor_check_flags_the_miscompiled_build() -> None:
    """The miscompiled serial branch: P.V's k-steps read B descriptors (UR18/19, UR14/15) that only
    the pipelined branch writes."""
    flagged = _script().undefined_descriptor_uses(gzip.decompress(MISCOMPILED.read_bytes()).decode())
    assert [(insn.split()[0], missing) for insn, missing in flagged] == [
        ("HGMMA.64x64x16.F32.BF16", [18, 19]), ("HGMMA.64x64x16.F32.BF16", [14, 15])], flagged


def _listing(*lines: str) -> str:
    """A listing in nvdisasm's form: labels as they are, instructions with addresses."""
    return "\n".join(ln if ln.startswith(".L") else f"        /*{16 * i:04x}*/  {ln} ;" for i, ln in enumerate(lines))


@pytest.mark.parametrize(
    "body,flagged",
    [
        # written on one side of a branch only
        (["@P0 BRA `(.L_x_1)", "UMOV UR18, 0x100", "UMOV UR19, 0x4", "BRA `(.L_x_2)", ".L_x_1:", "NOP",
          ".L_x_2:", "HGMMA.64x64x16.F32.BF16 R88, R120, gdesc[UR16].tnspB, R88"], [[18, 19]]),
        # written on both sides
        (["@P0 BRA `(.L_x_1)", "UMOV UR18, 0x100", "UMOV UR19, 0x4", "BRA `(.L_x_2)", ".L_x_1:",
          "UIADD3.64 UR18, UR4, 0x80, URZ", ".L_x_2:",
          "HGMMA.64x64x16.F32.BF16 R88, R120, gdesc[UR16].tnspB, R88"], []),
        # a guarded write does not count
        (["@P1 UMOV UR22, 0x1", "UMOV UR23, 0x4", "HGMMA.64x64x16.F32.BF16 R88, R120, gdesc[UR20].tnspB, R88"], [[22]]),
        # A from shared memory needs URn and URn+1 too
        (["UMOV.64 UR22, 0x1", "HGMMA.64x64x16.F32.BF16 R56, gdesc[UR20], RZ, !UPT"], [[20, 21]]),
        # written only after the use, in a loop: the first iteration reads it unwritten
        ([".L_x_1:", "HGMMA.64x64x16.F32.BF16 R88, R120, gdesc[UR16].tnspB, R88", "UIMAD.WIDE UR18, UR4, 0x3, URZ",
          "@P0 BRA `(.L_x_1)", "EXIT"], [[18, 19]]),
    ],
)
def test_descriptor_check_on_small_listings(body: list[str], flagged: list[list[int]]) -> None:
    assert [missing for _, missing in _script().undefined_descriptor_uses(_listing(*body))] == flagged


# ptxas -v reports as the bundled ptxas 12.8 printed them: the pipelined union consumer of
# kernel-notes v36 (serialised), and the Triton dK/dV kernel at head_dim 128 (spilling).
SERIALISED = """\
ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma \
instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in the function \
'_attn_fwd_union'
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd_union' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd_union
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 3 barriers
"""
SPILLING = """\
ptxas info    : Compiling entry function '_attn_bwd_dkdv' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dkdv
    120 bytes stack frame, 120 bytes spill stores, 120 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 120 bytes cumulative stack size
"""


def test_ptxas_report_reads_spills_registers_and_serialisation() -> None:
    report = _script().ptxas_report
    assert report(SERIALISED) == (0, "ptxas info    : Used 168 registers, used 3 barriers", True)
    assert report(SPILLING) == (
        240, "ptxas info    : Used 255 registers, used 1 barriers, 120 bytes cumulative stack size", False)
