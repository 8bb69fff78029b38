"""Where the 64-row Gluon forward loses against the 128-row one, on equal work (H200 diagnostic).

Wan 14B 720p (21x40x80, 40 heads, structured q/k, bf16), the 64-row table at 10 % kept, three
kernel-only forwards in one process, each against cuDNN's dense forward times its kept fraction:

- ``q64_real``: the table as built (the pair's two lists differ: the union kernel streams more
  blocks than either list, and the longer list sets the program's length);
- ``q64_equal_pairs``: the second row of every pair keeps the first row's blocks, so the union is
  the list and both consumers do the same work: what is left is the union kernel's structure
  (one-block steps, its per-position bookkeeping);
- ``q128_same_lists``: the same lists as a 128-row table (each pair's rows made one 128-row tile)
  on the 128-row Gluon kernel (two-block steps).

    PYTHONPATH=src python benchmarks/q64_diagnostic.py --out q64_diagnostic.json

``--profile`` runs each forward twice without timing, for a profiler (``benchmarks/ncu_q64.sh``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
from nabla_attn import BlockSparseMask, TokenLayout, VideoGrid, backends, tile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="q64_diagnostic.json")
    ap.add_argument("--profile", action="store_true", help="run each forward twice, untimed, and write nothing")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("q64_diagnostic needs a CUDA GPU (sm_90 for the Gluon kernels)", file=sys.stderr)
        return 2
    lay = TokenLayout(VideoGrid(21, 40, 80))
    heads, dev = 40, torch.device("cuda")
    qn, kn, vn = H.structured_qkv(lay, heads, 128, torch.bfloat16, dev)
    q, k, v = (tile(x, lay) for x in (qn, kn, vn))
    tri, scale = backends.get("triton"), 1 / math.sqrt(128)
    _, real = H.threshold_for_density(q, k, lay, 0.1, 64)
    pairs = lay.table("query_pairs", dev).long()
    kept = real.kept.clone()
    kept[:, :, pairs[:, 1]] = kept[:, :, pairs[:, 0]]
    equal = BlockSparseMask(kept.contiguous(), lay, 64)
    # Query blocks reordered so that each pair is one 128-row tile; keys stay in place.
    q_paired = q.view(1, heads, lay.num_blocks, 64, 128)[:, :, pairs.flatten()].reshape(q.shape)
    same = BlockSparseMask(kept[:, :, pairs[:, 0]].contiguous(), lay, 128)
    configs = (("q64_real", real, q), ("q64_equal_pairs", equal, q), ("q128_same_lists", same, q_paired))
    if args.profile:
        with torch.no_grad():
            for _, mask, qq in configs:
                plan = tri.plan(mask)
                for _ in range(2):
                    tri.attention(qq, k, v, mask, plan, scale)
        torch.cuda.synchronize()
        return 0
    with torch.no_grad():
        dense = H.time_ms(lambda: H.cudnn_attention(qn, kn, vn), budget_ms=600)
        rows = {}
        for name, mask, qq in configs:
            plan = tri.plan(mask)
            ms = H.time_ms(lambda: tri.attention(qq, k, v, mask, plan, scale), budget_ms=300)  # noqa: B023
            rows[name] = {"density": mask.density, "ms": ms, "frac_ideal": dense * mask.density / ms}
    print(f"{torch.cuda.get_device_name()}: cuDNN dense fwd {dense:.2f} ms (ideal = dense x kept fraction)")
    for name, r in rows.items():
        print(f"  {name:16s} kept {r['density']:.4f}  {r['ms']:6.2f} ms  {r['frac_ideal']:.0%} of ideal")
    Path(args.out).write_text(json.dumps({**H.environment(dev), "dense_cudnn_fwd_ms": dense, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
