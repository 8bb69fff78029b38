"""Backward lab: the two backward kernels' launch choices on one card, same call (H200 diagnostic).

Wan 14B 720p (21x40x80, 40 heads, structured q/k, bf16, head_dim 128), the 64-row table at 10 %
kept (and the 128-row table at the same threshold). The forward runs once; then the backend's
backward op (``torch.ops.nabla_attn.triton_attention_backward``: q-side lists, dQ, dK/dV) is timed
under each launch choice (``KernelConfig``: warps and pipeline stages of the dQ and dK/dV
kernels) in alternating rounds, so drift between rounds hits every variant alike. Reported per variant: the
median over rounds of each round's median, the spread, and the max abs difference of dq, dk, dv
against the default's. The default's kernels are split by torch.profiler (dQ, dK/dV, the q-side
list compaction) and given as a matmul rate: per kept (64-row query tile, 64-key block) pair the
dQ kernel computes 3 products (``Q.K^T``, ``dO.V^T``, ``dS.K``) and the dK/dV kernel 4, of
``2 * 64 * 64 * D`` FLOPs each. cuDNN's dense backward is timed in the same call (forward +
backward minus forward; 5 products of ``2 * H * S^2 * D`` FLOPs), so "x dense" and "of ideal"
(dense x kept fraction / time) use the same card and clocks.

    PYTHONPATH=src python benchmarks/bwd_lab.py --out bwd_lab.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
from nabla_attn import TokenLayout, VideoGrid, backends, nabla_mask_tiled, tile  # noqa: E402
from nabla_attn.backends.triton import DEFAULT_CONFIG, KernelConfig  # noqa: E402

D0 = DEFAULT_CONFIG
# name: the backward's launch choices; the first is the library default.
VARIANTS = {
    "default": D0,
    "dkdv_w8": replace(D0, dkdv_warps=8),
    "dkdv_s1": replace(D0, dkdv_stages=1),
    "dkdv_s3": replace(D0, dkdv_stages=3),
    "dq_w8": replace(D0, dq_warps=8),
    "dq_s3": replace(D0, dq_stages=3),
}
# Products per kept pair of each backward kernel.
PRODUCTS = {"_attn_bwd_dq": 3, "_attn_bwd_dkdv": 4}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bwd_lab.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bwd_lab needs a CUDA GPU", file=sys.stderr)
        return 2
    lay = TokenLayout(VideoGrid(21, 40, 80))
    heads, dev, D = 40, torch.device("cuda"), 128
    qn, kn, vn = H.structured_qkv(lay, heads, D, torch.bfloat16, dev)
    q, k, v = (tile(x, lay) for x in (qn, kn, vn))
    scale = 1 / math.sqrt(D)
    tri = backends.get("triton")
    do = torch.randn_like(q)

    # Dense cuDNN in the same call: backward = (forward + backward) - forward.
    leaves = [x.detach().requires_grad_() for x in (qn, kn, vn)]
    dense_f = H.time_ms(lambda: H.cudnn_attention(*leaves), budget_ms=600)
    dense_fb = H.time_ms(H.grad_step(H.cudnn_attention, leaves, do), budget_ms=1500)
    dense_b = dense_fb - dense_f
    product = 2 * heads * lay.seq_len**2 * D  # FLOPs of one dense product
    dense_rates = {"fwd": 2 * product / dense_f / 1e9, "bwd": 5 * product / dense_b / 1e9}
    print(f"{torch.cuda.get_device_name()}: cuDNN dense fwd {dense_f:.2f} ms ({dense_rates['fwd']:.0f} TFLOP/s), "
          f"fwd+bwd {dense_fb:.2f} ms, bwd {dense_b:.2f} ms ({dense_rates['bwd']:.0f} TFLOP/s)", flush=True)

    thr, m64 = H.threshold_for_density(q, k, lay, 0.1, 64)
    m128 = nabla_mask_tiled(q, k, lay, thr, None, query_block=128)
    names = args.variants.split(",")
    result: dict[str, Any] = {**H.environment(dev), "shape": "wan14b_720p", "threshold": thr,
                              "dense_cudnn_fwd_ms": dense_f, "dense_cudnn_fwdbwd_ms": dense_fb,
                              "dense_cudnn_bwd_ms": dense_b, "dense_cudnn_tflops": dense_rates,
                              "variants": {n: asdict(c) for n, c in VARIANTS.items()}, "tables": {}}
    for qb, mask in ((64, m64), (128, m128)):
        plan = tri.plan(mask)
        o, lse = torch.ops.nabla_attn.triton_attention(q, k, v, plan.counts, plan.indices, mask.kept, lay.key, qb,
                                                       scale, D0.encode())

        def bwd(cfg: KernelConfig) -> tuple[torch.Tensor, ...]:
            return torch.ops.nabla_attn.triton_attention_backward(  # noqa: B023
                do, q, k, v, o, lse, plan.counts, plan.indices, mask.kept, lay.key, qb, scale, cfg.encode())  # noqa: B023

        ref = bwd(VARIANTS["default"])
        rows: dict[str, Any] = {}
        for name in names:
            got = bwd(VARIANTS[name])
            rows[name] = {"max_abs_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref)),
                          "round_ms": []}
        for _ in range(args.rounds):
            for name in names:
                rows[name]["round_ms"].append(H.time_ms(lambda: bwd(VARIANTS[name]), budget_ms=400))  # noqa: B023
        for r in rows.values():
            r["ms"] = statistics.median(r["round_ms"])
            r["spread"] = (max(r["round_ms"]) - min(r["round_ms"])) / r["ms"]
            r["x_dense_bwd"] = dense_b / r["ms"]
            r["frac_ideal"] = dense_b * mask.density / r["ms"]
        split = H.profile_kernels(lambda: bwd(VARIANTS["default"]), top=6)
        kept64 = mask.kept if qb == 64 else mask.kept.repeat_interleave(2, dim=2)[:, :, : lay.num_blocks]
        pairs = int(kept64.sum())
        for row in split:
            name = next((n for n in PRODUCTS if row["kernel"].startswith(n)), None)
            if name:
                row["tflops"] = PRODUCTS[name] * 2 * 64 * 64 * D * pairs / row["ms"] / 1e9
        result["tables"][f"q{qb}"] = {"density": mask.density, "rows": rows, "default_kernels": split}
        print(f"\nq{qb} table, kept {mask.density:.4f} (threshold {thr:.4f}); default's kernels:")
        for s in split:
            rate = f"  {s['tflops']:.0f} TFLOP/s" if "tflops" in s else ""
            print(f"  {s['ms']:8.2f} ms  x{s['calls']}  {s['kernel']}{rate}")
        print(f"  {'variant':12s} {'ms':>8s} {'spread':>7s} {'x dense':>8s} {'of ideal':>8s} {'diff':>8s}")
        for name, r in rows.items():
            print(f"  {name:12s} {r['ms']:8.2f} {r['spread']:7.1%} {r['x_dense_bwd']:8.2f} {r['frac_ideal']:8.0%} "
                  f"{r['max_abs_diff']:8.1e}", flush=True)
        del o, lse
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
