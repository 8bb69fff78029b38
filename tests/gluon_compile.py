"""Compile the kernels a Hopper card runs (sm_90a) on a machine without a GPU.

The Gluon kernels run only on sm_90, so CI (no GPU) never builds them; a Gluon error or a register
spill would surface only on the device. The Triton kernels are built too (their spills are
reported, not required to be zero). Triton can compile for a target it is not running on: here
a stand-in driver reports an sm_90 target and turns every launch into a no-op, the real launcher
(:func:`nabla_attn.kernels.attention_ws.forward`) runs on CPU tensors, and the bundled ``ptxas``
assembles each compiled kernel for sm_90a with ``-v``, which reports its spills and whether it
serialised the kernel's wgmma instructions (its C7514 notice, which a Gluon kernel that keeps a
product in flight across a loop's register copies gets: docs/kernel-notes.md, v36). Outputs are
never computed: this checks that the kernels build, not what they compute (``scripts/test_gpu.sh``
does).

It also reads each kernel's machine code (the bundled ``nvdisasm``) for one miscompile seen in this
project (docs/kernel-notes.md, v33): ptxas 12.8 let a wgmma (``HGMMA``) read its shared-memory
descriptors from uniform registers that only another branch had written, so one consumer computed
from the wrong V rows. :func:`undefined_descriptor_uses` flags any ``HGMMA`` whose descriptor
registers are not written on every path from the kernel's entry.

    python tests/gluon_compile.py   # one line per build; exit status 1 on a Gluon spill or serialisation, or a flag

Run it in a process of its own without ``TRITON_INTERPRET`` (the interpreter replaces compilation).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


def ptxas_report(stderr: str) -> tuple[int, str, bool]:
    """From ``ptxas -v``'s report on one kernel: spill bytes (stores + loads), the register line,
    and whether ptxas serialised the kernel's wgmma instructions (its C7514 notice: an instruction
    reads a wgmma's accumulator registers while the product may still be in flight, so every
    wgmma of the kernel waits for the previous one)."""
    counts = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", stderr)]
    regs = next((ln.strip() for ln in stderr.splitlines() if re.search(r"Used \d+ registers", ln)), "")
    return sum(counts), regs, "C7514" in stderr


def bundled(tool: str) -> Path:
    """A CUDA tool Triton ships with its NVIDIA backend (``ptxas``, ``nvdisasm``)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def assemble(ptx: str) -> tuple[int, str, bool]:
    """:func:`ptxas_report` of one kernel's PTX assembled for sm_90a by the bundled ptxas."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.ptx")
        path.write_text(ptx)
        r = subprocess.run([str(bundled("ptxas")), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    return ptxas_report(r.stderr)


_INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?P<body>[^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_GUARD = re.compile(r"^@!?U?P[T\d]+\s+")
_JUMPS = ("BRA", "BRX", "JMP")
_ENDS = ("EXIT", "RET")


def _uniform_defs(opcode: str, operands: str) -> set[int]:
    """Uniform registers an instruction writes: its first operand when that is ``URn`` (and
    ``URn+1`` for 64-bit and widening forms)."""
    m = re.fullmatch(r"UR(\d+)", operands.split(",")[0].strip())
    if not m:
        return set()
    n = int(m.group(1))
    return {n, n + 1} if (".64" in opcode or ".WIDE" in opcode) else {n}


def undefined_descriptor_uses(sass: str) -> list[tuple[str, list[int]]]:
    """``HGMMA`` instructions of one kernel's ``nvdisasm -c`` listing whose descriptor registers
    (``gdesc[URn]``: A at ``URn``/``URn+1`` unless A is in registers, B at ``URn+2``/``URn+3``) are
    not written on every path from the entry, with the missing registers. A forward data-flow
    analysis over basic blocks (intersection at joins); predicated writes do not count."""
    insns: list[tuple[bool, str, str]] = []  # (guarded, opcode, operands)
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(insns)
        elif m := _INSN.match(line):
            body = m.group("body").strip()
            opcode, _, operands = _GUARD.sub("", body).partition(" ")
            insns.append((bool(_GUARD.match(body)), opcode, operands.strip()))
    n = len(insns)
    leaders = {0, *labels.values(), *(i + 1 for i, (_, op, _) in enumerate(insns) if op.startswith(_JUMPS + _ENDS))}
    starts = sorted(x for x in leaders if x < n)
    blocks = list(zip(starts, [*starts[1:], n]))
    block_at = {s: b for b, (s, _) in enumerate(blocks)}
    succ: list[set[int]] = []
    for s, e in blocks:
        guarded, op, operands = insns[e - 1]
        nxt = {block_at[e]} if e < n else set()
        if op.startswith(_JUMPS):
            targets = {block_at[labels[t]] for t in re.findall(r"\.L_x_\d+", operands) if t in labels}
            succ.append(targets | (nxt if guarded else set()))
        elif op.startswith(_ENDS):
            succ.append(nxt if guarded else set())
        else:
            succ.append(nxt)
    preds: list[set[int]] = [set() for _ in blocks]
    for b, targets in enumerate(succ):
        for t in targets:
            preds[t].add(b)

    def written(b: int, before: frozenset[int]) -> frozenset[int]:
        s, e = blocks[b]
        out = set(before)
        for guarded, op, operands in insns[s:e]:
            if not guarded:
                out |= _uniform_defs(op, operands)
        return frozenset(out)

    # None: not reached yet (the universal set of the intersection).
    entry: list[frozenset[int] | None] = [frozenset()] + [None] * (len(blocks) - 1)
    exit_: list[frozenset[int] | None] = [None] * len(blocks)
    changed = True
    while changed:
        changed = False
        for b in range(len(blocks)):
            if b:
                reached = [exit_[p] for p in preds[b] if exit_[p] is not None]
                if not reached:
                    continue
                entry[b] = frozenset.intersection(*reached)
            out = written(b, entry[b])
            if out != exit_[b]:
                exit_[b], changed = out, True
    flagged = []
    for b, (s, e) in enumerate(blocks):
        if entry[b] is None:
            continue
        have = set(entry[b])
        for guarded, op, operands in insns[s:e]:
            if op.startswith("HGMMA") and (m := re.search(r"gdesc\[UR(\d+)\]", operands)):
                base = int(m.group(1))
                a_in_registers = re.match(r"R\d+\s*,\s*R\d+", operands) is not None
                need = {base + 2, base + 3} | (set() if a_in_registers else {base, base + 1})
                if missing := sorted(need - have):
                    flagged.append((f"{op} {operands}", missing))
            if not guarded:
                have |= _uniform_defs(op, operands)
    return flagged


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (the one Triton bundles)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        return subprocess.run([str(bundled("nvdisasm")), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout


@dataclass(frozen=True)
class Build:
    """One kernel build for sm_90a."""

    name: str
    gluon: bool  # the Gluon forward (must not spill or serialise); else a Triton kernel (reported only)
    spill_bytes: int
    registers: str  # ptxas's register line
    serialized: bool  # ptxas serialised its wgmma instructions (C7514)
    flagged: list[tuple[str, list[int]]]  # undefined_descriptor_uses of its machine code


def build_all() -> list[Build]:
    """Build every launch variant of the Gluon forward (128- and 64-row tables, head_dim 64 and
    128, with and without padded blocks, at 128 also with the natural-order output) and of the
    Triton kernels a Hopper card runs in bfloat16 (the forward on 64- and 128-row tiles, the two
    backward kernels; tensor-descriptor loads)."""
    from triton.runtime import driver

    # For this process only: nothing here can launch a kernel afterwards (no default driver to go
    # back to on a machine without a GPU).
    driver.set_active(_NoLaunch())
    from nabla_attn.backends.triton import DEFAULT_CONFIG as cfg
    from nabla_attn.kernels import attention as tri
    from nabla_attn.kernels import attention_ws as ws

    B, H, S = 1, 2, 1024
    nq = S // 64
    for D in (64, 128):
        for padded in (False, True):
            q = torch.zeros(B, H, S, D, dtype=torch.bfloat16)
            lse = torch.zeros(B, H, S, dtype=torch.float32)
            bcnt = torch.full((nq,), 64, dtype=torch.int32)
            kept = torch.ones(B, H, nq, nq, dtype=torch.bool)
            counts = torch.full((B, H, nq), nq, dtype=torch.int32)
            indices = torch.arange(nq, dtype=torch.int32).expand(B, H, nq, nq).contiguous()
            pairs = torch.arange(nq, dtype=torch.int32).view(-1, 2)
            c128, i128 = counts[..., : nq // 2], indices[..., : nq // 2, :].contiguous()
            # The forward-only epilogue writing natural order, at head_dim 128 (the register-heaviest).
            outs = [{}] + ([{"out": q, "rows": torch.arange(S, dtype=torch.int32)}] if D == 128 else [])
            for out in outs:
                ws.forward(q, q, q, c128, i128, bcnt, 0.1, padded=padded, **out)
                ws.forward(q, q, q, counts, indices, bcnt, 0.1, padded=padded, kept=kept, pairs=pairs, **out)
            for tile, c, i in ((64, counts, indices), (128, c128, i128)):
                tri.forward(q, q, q, c, i, bcnt, 0.1, tile_m=tile, padded=padded, tma=True, warps=cfg.fwd_warps,
                            stages=cfg.fwd_stages)
            tri.backward(q, q, q, q, q, lse, counts, indices, counts, indices, bcnt, 0.1, list_shift=0, padded=padded,
                         tma=True, dq_warps=cfg.dq_warps, dq_stages=cfg.dq_stages, dkdv_warps=cfg.dkdv_warps,
                         dkdv_stages=cfg.dkdv_stages)
    built: list[Build] = []
    kernels = ((ws._attn_fwd_ws, "Gluon forward, 128-row table"), (ws._attn_fwd_union, "Gluon forward, 64-row table"),
               (tri._attn_fwd, "Triton forward"), (tri._attn_bwd_dq, "Triton dQ"), (tri._attn_bwd_dkdv, "Triton dK/dV"))
    for fn, label in kernels:
        for kernel in fn.device_caches[0][0].values():
            const = {fn.arg_names[key[0]]: value for key, value in kernel.src.constants.items()}
            tile = f", {const['BLOCK_M']}-row tiles" if label == "Triton forward" else ""
            output = ", natural-order output" if const.get("NATURAL") else ""
            name = f"{label}{tile}, head_dim {const['HEAD_DIM']}" + (", padded" if const["PAD"] else "") + output
            flagged = undefined_descriptor_uses(disassemble(kernel.asm["cubin"]))
            built.append(Build(name, label.startswith("Gluon"), *assemble(kernel.asm["ptx"]), flagged))
    return built


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gluon_compile: unset TRITON_INTERPRET (the interpreter replaces compilation)", file=sys.stderr)
        return 2
    built = build_all()
    for b in built:
        print(f"{b.name:54s} spill bytes {b.spill_bytes:4d}   undefined descriptors {len(b.flagged)}   "
              f"{'wgmma serialised   ' if b.serialized else ''}{b.registers}")
        for insn, missing in b.flagged:
            print(f"    {insn}: UR{', UR'.join(map(str, missing))} not written on every path")
    gluon = [b for b in built if b.gluon]
    spilling = sum(b.spill_bytes > 0 for b in gluon)
    serialized = sum(b.serialized for b in gluon)
    miscompiled = sum(bool(b.flagged) for b in built)
    print(f"{len(gluon)} Gluon builds for sm_90a, {spilling} with spills, {serialized} with serialised wgmma")
    print(f"{len(built)} builds for sm_90a, {miscompiled} with undefined descriptors")
    return 1 if spilling or serialized or miscompiled else 0


if __name__ == "__main__":
    sys.exit(main())
