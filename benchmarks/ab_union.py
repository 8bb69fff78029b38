"""A/B of two versions of the 64-row Gluon forward (the union kernel) on one card, same call (H200).

``argv[1]``: a copy of another version's ``kernels/attention_ws.py`` (loaded as
``nabla_attn.kernels.attention_ws_old``), timed against this tree's kernel on Wan 14B 720p
(21x40x80) and the padded 21x45x80 grid, structured q/k, 64-row tables at 5/10/20/30 % kept,
kernel alone on pre-tiled input, in alternating rounds (``ROUNDS``, default 3). Each version's
max abs difference against the Triton kernel is printed, and cuDNN's dense forward of the same
call gives "of ideal" (dense x kept fraction / time).

    git show main:src/nabla_attn/kernels/attention_ws.py > /tmp/old.py
    PYTHONPATH=src python benchmarks/ab_union.py /tmp/old.py      # writes $OUT/ab_union.json
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
from nabla_attn import TokenLayout, VideoGrid, backends, tile  # noqa: E402
from nabla_attn.backends.triton import DEFAULT_CONFIG as D0  # noqa: E402
from nabla_attn.kernels import attention_ws as new  # noqa: E402


def main() -> int:
    spec = importlib.util.spec_from_file_location("nabla_attn.kernels.attention_ws_old", sys.argv[1])
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)
    tri, dev = backends.get("triton"), torch.device("cuda")
    rounds = int(os.environ.get("ROUNDS", "3"))
    out: dict = {**H.environment(dev), "rows": {}}
    for grid in ((21, 40, 80), (21, 45, 80)):
        lay = TokenLayout(VideoGrid(*grid))
        qn, kn, vn = H.structured_qkv(lay, 40, 128, torch.bfloat16, dev)
        q, k, v = (tile(x, lay) for x in (qn, kn, vn))
        scale = 1 / math.sqrt(128)
        with torch.no_grad():
            dense = H.time_ms(lambda: H.cudnn_attention(qn, kn, vn), budget_ms=600)
        pairs, bc = lay.table("query_pairs", dev), lay.block_counts(dev)
        for density in (0.05, 0.1, 0.2, 0.3):
            _, m = H.threshold_for_density(q, k, lay, density, 64)
            plan = tri.plan(m)
            fns = {name: (lambda mod=mod: mod.forward(q, k, v, plan.counts, plan.indices, bc, scale,  # noqa: B023
                                                      padded=lay.padded, stages=D0.ws_stages, kept=m.kept,  # noqa: B023
                                                      pairs=pairs)[0])  # noqa: B023
                   for name, mod in (("old", old), ("new", new))}
            with torch.no_grad():
                ref = tri.attention(q, k, v, m, plan, scale, config=replace(D0, warp_specialized=False))
                diffs = {n: float((fn().float() - ref.float()).abs().max()) for n, fn in fns.items()}
                ms = H.alternating_rounds(fns, rounds, budget_ms=300)
            key = f"{grid[0]}x{grid[1]}x{grid[2]} kept {m.density:.3f}"
            out["rows"][key] = {"dense_cudnn_fwd_ms": dense, "ms": ms, "max_abs_diff_vs_triton": diffs}
            best = {n: min(x) for n, x in ms.items()}
            print(f"{key}: cuDNN {dense:.2f} | old {best['old']:.2f} ({' '.join(f'{x:.2f}' for x in ms['old'])}) "
                  f"| new {best['new']:.2f} ({' '.join(f'{x:.2f}' for x in ms['new'])}) | of ideal old "
                  f"{dense * m.density / best['old']:.0%} new {dense * m.density / best['new']:.0%} | diff vs Triton "
                  f"old {diffs['old']:.1e} new {diffs['new']:.1e}", flush=True)
    Path(os.environ.get("OUT", "."), "ab_union.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
