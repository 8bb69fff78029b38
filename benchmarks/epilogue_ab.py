"""The op's natural-order epilogue against a separate untiling pass, same call (H200).

On natural-order input a forward-only call of the op has the kernel write its output straight into
natural order (v's memory layout) instead of writing tiled order for an untiling pass to copy. This
script times, on one card and in alternating rounds (``ROUNDS``, default 3), the two ways of
finishing the call from the same pre-tiled q, k, v and the same mask:

- ``separate``: ``untile(attention(...), like=v)``, the op's last two steps before this change;
- ``fused``: ``attention_natural(..., like=v)`` without gradients, the op's path now;
- ``untile``: the untiling pass alone (the predicted saving);

plus the whole public op (forward) and cuDNN's dense attention of the same call. Inputs: structured
q, k in ``[B, S, H, D]`` memory (as diffusers hands them over), Wan 14B 720p (21x40x80) and the
padded 21x45x80 grid, both query blocks, 5 and 10 % kept. Outputs are checked equal (bit for bit)
before timing. (With gradients the op untiles: writing both orders in a training step measured no
faster, kernel-notes v38; that comparison is on the branch ``wip/natural-epilogue``.)

    PYTHONPATH=src python benchmarks/epilogue_ab.py      # writes $OUT/epilogue_ab_h200.json
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
from nabla_attn import TokenLayout, VideoGrid, backends, nabla_attention, tile  # noqa: E402


def main() -> int:
    tri, dev = backends.get("triton"), torch.device("cuda")
    rounds = int(os.environ.get("ROUNDS", "3"))
    out: dict = {**H.environment(dev), "rows": {}}
    scale = 1 / math.sqrt(128)
    for grid in ((21, 40, 80), (21, 45, 80)):
        lay = TokenLayout(VideoGrid(*grid))
        qn, kn, vn = (H.bshd(x) for x in H.structured_qkv(lay, 40, 128, torch.bfloat16, dev))
        qt, kt, vt = (tile(x, lay) for x in (qn, kn, vn))
        with torch.no_grad():
            dense = H.time_ms(lambda: H.cudnn_attention(qn, kn, vn), budget_ms=600)  # noqa: B023
        for qb in (64, 128):
            for density in (0.05, 0.1):
                thr, m = H.threshold_for_density(qt, kt, lay, density, qb)
                plan = tri.plan(m)
                with torch.no_grad():
                    o_t = tri.attention(qt, kt, vt, m, plan, scale)
                    fns = {
                        "separate": lambda: tri.untile(tri.attention(qt, kt, vt, m, plan, scale), lay,  # noqa: B023
                                                       like=vn),  # noqa: B023
                        "fused": lambda: tri.attention_natural(qt, kt, vt, m, plan, scale, like=vn),  # noqa: B023
                        "untile": lambda: tri.untile(o_t, lay, like=vn),  # noqa: B023
                        "op": lambda: nabla_attention(qn, kn, vn, lay.grid, thr, query_block=qb),  # noqa: B023
                    }
                    a, b = fns["separate"](), fns["fused"]()
                    assert a.stride() == b.stride() == vn.stride() and torch.equal(a, b), "outputs differ"
                    ms = H.alternating_rounds(fns, rounds, budget_ms=300)
                med = {n: sorted(x)[len(x) // 2] for n, x in ms.items()}
                key = f"{grid[0]}x{grid[1]}x{grid[2]} q{qb} kept {m.density:.3f}"
                out["rows"][key] = {"grid": grid, "query_block": qb, "threshold": thr, "density": m.density,
                                    "dense_cudnn_fwd_ms": dense, "ms": ms, "median_ms": med}
                print(f"{key}: cuDNN {dense:.2f} | op {med['op']:.2f} ({dense / med['op']:.2f}x) | separate "
                      f"{med['separate']:.2f} fused {med['fused']:.2f} (saved {med['separate'] - med['fused']:.2f}; "
                      f"untile alone {med['untile']:.2f})", flush=True)
    Path(os.environ.get("OUT", "."), "epilogue_ab_h200.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
