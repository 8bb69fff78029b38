"""Summarise Nsight Compute's per-instruction page (``ncu --page source --csv --print-source sass``,
as ``benchmarks/ncu_q64.sh`` with ``NCU_FULL=1`` writes it): per profiled kernel, instructions
executed and warp-stall samples by opcode, and the instructions with the most samples with their
top stall reasons.

    python benchmarks/ncu_sass_summary.py benchmarks/results/ncu_q64_sass_h200.csv.gz [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys
from typing import Any


def kernels(path: str) -> list[dict[str, Any]]:
    """The csv's kernels in order: name and rows (dicts keyed by the header)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        lines = f.read().splitlines()
    out: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith('"Kernel Name"'):
            out.append({"name": line.split(",")[1].strip('"'), "lines": []})
        elif out:
            out[-1]["lines"].append(line)
    for k in out:
        rows = list(csv.reader(k.pop("lines")))
        k["rows"] = [dict(zip(rows[0], r)) for r in rows[1:] if len(r) == len(rows[0])]
        k["reasons"] = [h for h in rows[0] if h.startswith("stall_") and "Not Issued" not in h]
    return out


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    for i, k in enumerate(kernels(args.csv)):
        rows = k["rows"]
        executed = sum(num(r["Instructions Executed"]) for r in rows)
        samples = sum(num(r["Warp Stall Sampling (All Samples)"]) for r in rows)
        print(f"== launch {i}: {k['name']}: {executed / 1e9:.3f} G instructions executed, {samples:.0f} samples")
        by_op: collections.Counter[str] = collections.Counter()
        by_op_samples: collections.Counter[str] = collections.Counter()
        for r in rows:
            by_op[opcode(r["Source"])] += num(r["Instructions Executed"])
            by_op_samples[opcode(r["Source"])] += num(r["Warp Stall Sampling (All Samples)"])
        print("   opcode      executed (G)   share of samples")
        for op, n in by_op.most_common(20):
            print(f"   {op:10s} {n / 1e9:12.3f}   {by_op_samples[op] / samples:8.1%}")
        print("   instructions with the most samples (address, share, executed, source, top stall reasons):")
        for r in sorted(rows, key=lambda r: -num(r["Warp Stall Sampling (All Samples)"]))[: args.top]:
            s = num(r["Warp Stall Sampling (All Samples)"])
            top = sorted(((num(r[h]), h[6:]) for h in k["reasons"]), reverse=True)[:3]
            print(f"   {r['Address'][-5:]} {s / samples:6.2%} {num(r['Instructions Executed']) / 1e6:6.1f} M  "
                  f"{r['Source'][:58]:58s} " + " ".join(f"{n}:{v / max(s, 1):.0%}" for v, n in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
