"""Compile the warp-specialised Gluon forward for Hopper (sm_90a) on a machine without a GPU.

The Gluon kernels run only on sm_90, so CI (no GPU) never builds them; a Gluon error or a register
spill would surface only on the device. Triton can compile for a target it is not running on: here
a stand-in driver reports an sm_90 target and turns every launch into a no-op, the real launcher
(:func:`nabla_attn.kernels.attention_ws.forward`) runs on CPU tensors, and the bundled ``ptxas``
assembles each compiled kernel for sm_90a with ``-v``, which reports its spills. Outputs are never
computed: this checks that the kernels build, not what they compute (``scripts/test_gpu.sh`` does).

    python tests/gluon_compile.py       # one line per kernel build; exit status 1 on a spill

Run it in a process of its own without ``TRITON_INTERPRET`` (the interpreter replaces compilation).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

class _NoLaunch:
    """What the JIT and CompiledKernel ask of a driver, for an sm_90 device that is not there."""

    class utils:  # noqa: N801 - the attribute name the JIT uses
        @staticmethod
        def get_device_properties(device: int) -> dict[str, int]:
            from nabla_attn.kernels.attention_ws import SMEM_BYTES

            return {"max_shared_mem": SMEM_BYTES, "multiprocessor_count": 132}

        @staticmethod
        def load_binary(name, kernel, shared, device):  # noqa: ANN001, ANN205
            return None, None, 0, 0, 1024

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):  # noqa: ANN201
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):  # noqa: ANN001, ANN201
        return lambda *args, **kwargs: None


def spills(ptx: str) -> tuple[int, str]:
    """Spill bytes (stores + loads) ptxas reports for one kernel's PTX, and its register line."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.ptx")
        path.write_text(ptx)
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    counts = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)]
    regs = next((ln.strip() for ln in r.stderr.splitlines() if "registers" in ln), "")
    return sum(counts), regs


def build_all() -> list[tuple[str, int, str]]:
    """Build every launch variant of the Gluon forward (128- and 64-row tables, head_dim 64 and
    128, with and without padded blocks): ``(variant, spill bytes, ptxas register line)``."""
    from triton.runtime import driver

    # For this process only: nothing here can launch a kernel afterwards (no default driver to go
    # back to on a machine without a GPU).
    driver.set_active(_NoLaunch())
    from nabla_attn.kernels import attention_ws as ws

    built: list[tuple[str, int, str]] = []
    B, H, S = 1, 2, 1024
    nq = S // 64
    for D in (64, 128):
        for padded in (False, True):
            q = torch.zeros(B, H, S, D, dtype=torch.bfloat16)
            bcnt = torch.full((nq,), 64, dtype=torch.int32)
            kept = torch.ones(B, H, nq, nq, dtype=torch.bool)
            counts = torch.full((B, H, nq), nq, dtype=torch.int32)
            indices = torch.arange(nq, dtype=torch.int32).expand(B, H, nq, nq).contiguous()
            pairs = torch.arange(nq, dtype=torch.int32).view(-1, 2)
            ws.forward(q, q, q, counts[..., : nq // 2], indices[..., : nq // 2, :], bcnt, 0.1, padded=padded)
            ws.forward(q, q, q, counts, indices, bcnt, 0.1, padded=padded, kept=kept, pairs=pairs)
    for fn, table in ((ws._attn_fwd_ws, 128), (ws._attn_fwd_union, 64)):
        for kernel in fn.device_caches[0][0].values():
            const = {fn.arg_names[key[0]]: value for key, value in kernel.src.constants.items()}
            name = f"{table}-row table, head_dim {const['HEAD_DIM']}" + (", padded" if const["PAD"] else "")
            built.append((name, *spills(kernel.asm["ptx"])))
    return built


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gluon_compile: unset TRITON_INTERPRET (the interpreter replaces compilation)", file=sys.stderr)
        return 2
    built = build_all()
    for name, spilled, regs in built:
        print(f"{name:40s} spill bytes {spilled:5d}   {regs}")
    print(f"{len(built)} Gluon builds for sm_90a, {sum(s > 0 for _, s, _ in built)} with spills")
    return 1 if any(s for _, s, _ in built) else 0


if __name__ == "__main__":
    sys.exit(main())
