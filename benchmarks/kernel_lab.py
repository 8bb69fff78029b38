"""Kernel lab: the current kernels and their launch choices side by side on one card.

Not the user-facing benchmark (that is ``bench_attention.py``): this answers "which launch choice
is faster, by how much" in one process, against the cuDNN dense forward measured in the same run,
on Wan 14B 720p (21x40x80, no padding) and the padded 21x45x80 grid diffusers runs at 720p:

- forward, kernel alone on pre-tiled q, k, v: the Triton kernel on 64- and 128-row tables (TMA
  on/off, warps/stages) and the warp-specialised Gluon forward on both (ring slots);
- forward + backward, kernel alone (TMA on/off in the backward, pipeline stages);
- the mask builder's stages: pooling (warps), the block-score product (``tf32x3``, ``ieee``,
  ``tf32``, torch float32; table entries that differ from the table of float64 scores), the row
  kernel (warps) for both tables, the whole build, and tiling with and without the block means.

Each variant's output is compared with the default configuration's (max abs difference), so a fast
but wrong variant shows at once; ``--errors`` adds float64 errors under the flash-attention rule.

    PYTHONPATH=src python benchmarks/kernel_lab.py --out kernel_lab.json
    PYTHONPATH=src python benchmarks/kernel_lab.py --smoke        # CPU, Triton interpreter (no Gluon)
"""

from __future__ import annotations

import cpu_smoke  # first: a smoke run switches Triton's interpreter on before anything loads Triton

SMOKE = cpu_smoke.setup()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

import harness as H  # noqa: E402
from nabla_attn import MaskSpec, TokenLayout, VideoGrid, backends, tile, untile  # noqa: E402
from nabla_attn.backends.triton import DEFAULT_CONFIG as D0  # noqa: E402

# On sm_90 the forward runs the Gluon kernel unless warp_specialized=False.
TK = replace(D0, warp_specialized=False)
FWD = {
    "triton_q64": (64, TK), "triton_q64_no_tma": (64, replace(TK, tma=False)),
    "triton_q64_s3": (64, replace(TK, fwd_stages=3)), "gluon_q64": (64, D0), "gluon_q64_adjacent": (64, D0),
    "triton_q128": (128, TK), "triton_q128_no_tma": (128, replace(TK, tma=False)),
    "triton_q128_w8_s3": (128, replace(TK, fwd_warps=8, fwd_stages=3)),
    "gluon_q128": (128, D0), "gluon_q128_s2": (128, replace(D0, ws_stages=2)),
}
BWD = {
    "q64": (64, D0), "q128": (128, D0), "q128_bwd_no_tma": (128, replace(D0, bwd_tma=False)),
    "q128_bwd_s3": (128, replace(D0, dq_stages=3, dkdv_stages=3)), "q128_bwd_w8": (128, replace(D0, dq_warps=8, dkdv_warps=8)),
}


def adjacent_pairs(rows: int, device: torch.device) -> torch.Tensor:
    """Rows (2i, 2i+1) as the 64-row Gluon forward's pairs (the pairing before v31)."""
    order = torch.arange(rows, device=device, dtype=torch.int32)
    if rows % 2:
        order = torch.cat([order, order.new_full((1,), -1)])
    return order.view(-1, 2)


def adjacent_pairs_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, plan: Any,
                           scale: float) -> torch.Tensor:
    """The 64-row Gluon forward with side-by-side tiles as pairs instead of the layout's."""
    from nabla_attn.kernels import attention_ws

    lay = mask.layout
    return attention_ws.forward(q, k, v, plan.counts, plan.indices, lay.block_counts(q.device), scale,
                                padded=lay.padded, stages=D0.ws_stages, kept=mask.kept,
                                pairs=adjacent_pairs(mask.kept.shape[2], q.device))[0]


def kernel_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: dict[int, Any], dense_ms: float,
                names: list[str], errors: bool) -> dict[str, Any]:
    tri, scale = backends.get("triton"), 1 / math.sqrt(q.shape[-1])
    plans = {qb: tri.plan(m) for qb, m in masks.items()}
    out: dict[str, Any] = {"fwd": {}, "fwdbwd": {}}
    with torch.no_grad():
        ref = {qb: tri.attention(q, k, v, masks[qb], plans[qb], scale) for qb in masks}
    for name in (n for n in names if n in FWD):
        qb, cfg = FWD[name]
        fn: Callable[[], torch.Tensor] = lambda: tri.attention(q, k, v, masks[qb], plans[qb], scale, config=cfg)  # noqa: E731, B023
        if name == "gluon_q64_adjacent":
            fn = lambda: adjacent_pairs_forward(q, k, v, masks[qb], plans[qb], scale)  # noqa: E731
        row: dict[str, Any] = {"query_block": qb, "config": asdict(cfg)}
        try:
            with torch.no_grad():
                o = fn()
                row["max_abs_diff_vs_default"] = float((o.float() - ref[qb].float()).abs().max())
                row["ms"] = H.time_ms(fn, budget_ms=300)
            row["speedup"], row["frac_ideal"] = dense_ms / row["ms"], dense_ms * masks[qb].density / row["ms"]
            if errors:
                lay = masks[qb].layout
                e = H.masked_errors(untile(q, lay), untile(k, lay), untile(v, lay), masks[qb], {name: untile(o, lay)},
                                    scale, rows=1024)
                row["err_ratio_vs_torch"] = e[name]["ratio_vs_torch"]
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is a result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["fwd"][name] = row
        print(f"  fwd {name:20s} " + (f"{row['ms']:7.2f} ms ({row['speedup']:.2f}x, {row['frac_ideal']:.0%} of ideal, "
              f"diff {row['max_abs_diff_vs_default']:.1e})" if "ms" in row else row["error"][:120]), flush=True)
    g = torch.randn_like(q)
    for name in (n for n in names if n in BWD):
        qb, cfg = BWD[name]
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step() -> None:
            for x in leaves:
                x.grad = None
            tri.attention(*leaves, masks[qb], plans[qb], scale, config=cfg).backward(g)  # noqa: B023

        try:
            out["fwdbwd"][name] = {"query_block": qb, "config": asdict(cfg), "ms": H.time_ms(step, budget_ms=400)}
        except Exception as exc:  # noqa: BLE001
            out["fwdbwd"][name] = {"query_block": qb, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        r = out["fwdbwd"][name]
        print(f"  fwd+bwd {name:16s} " + (f"{r['ms']:7.2f} ms" if "ms" in r else r["error"][:120]), flush=True)
    return out


def mask_lab(q: torch.Tensor, k: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, layout: TokenLayout,
             thresholds: dict[int, float]) -> dict[str, Any]:
    """The builder's stages on pre-tiled q, k (``qn``, ``kn``: natural order, for the tiling rows)."""
    from nabla_attn.kernels.mask_build import block_scores, pool_pair

    nv, counts, tri = layout.num_video_blocks, layout.block_counts(q.device), backends.get("triton")
    spec64 = MaskSpec(thresholds[64], None, 64)
    qa, ka = pool_pair(q, k, counts, nv)
    out: dict[str, Any] = {"pool": {}, "scores": {}, "rows": {}, "total": {}, "tiling": {}}
    for w in (1, 2, 4):
        out["pool"][f"warps{w}_ms"] = H.time_ms(lambda: pool_pair(q, k, counts, nv, warps=w))  # noqa: B023
    exact = ((qa.double() @ ka.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])).float()
    truth = H.table_from_scores(exact, layout, spec64)[0]
    products: dict[str, Callable[[], torch.Tensor]] = {
        "torch_fp32": lambda: (qa @ ka.transpose(-1, -2)) / math.sqrt(q.shape[-1]),
        "tf32x3": lambda: block_scores(qa, ka, "tf32x3"), "ieee": lambda: block_scores(qa, ka, "ieee"),
        "tf32": lambda: block_scores(qa, ka, "tf32"),
    }
    for name, f in products.items():
        try:
            kept = H.table_from_scores(f(), layout, spec64)[0]
            out["scores"][name] = {"ms": H.time_ms(f), "entries_differ_vs_fp64_table": int((kept != truth).sum())}
        except Exception as exc:  # noqa: BLE001 - a precision the card cannot run is a result
            out["scores"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    scores = block_scores(qa, ka)
    for qb, thr in thresholds.items():
        spec = MaskSpec(thr, None, qb)
        for w in (1, 2, 4):
            out["rows"][f"q{qb}_warps{w}_ms"] = H.time_ms(lambda: H.table_from_scores(scores, layout, spec, row_warps=w))  # noqa: B023
        out["total"][f"q{qb}_tiled_ms"] = H.time_ms(lambda: tri.build_mask(q, k, layout, spec))  # noqa: B023
    out["tiling"]["tile_qk_ms"] = H.time_ms(lambda: (tri.tile(qn, layout), tri.tile(kn, layout)))
    out["tiling"]["tile_qk_with_means_ms"] = H.time_ms(lambda: (tri.tile(qn, layout, pool=True), tri.tile(kn, layout, pool=True)))
    for part in ("pool", "rows", "total", "tiling"):
        print(f"  mask {part} (ms): " + ", ".join(f"{n} {x:.3f}" for n, x in out[part].items()), flush=True)
    for name, r in out["scores"].items():
        print(f"  mask scores {name}: {r.get('ms', math.nan):.3f} ms, "
              f"{r.get('entries_differ_vs_fp64_table', r.get('error'))} table entries differ from float64 scores")
    return out


def lab_shape(sname: str, layout: TokenLayout, heads: int, head_dim: int, dtype: torch.dtype, dev: torch.device,
              names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    qn, kn, vn = H.structured_qkv(layout, heads, head_dim, dtype, dev)
    q, k, v = (tile(x, layout) for x in (qn, kn, vn))
    with torch.no_grad():
        dense = H.time_ms(lambda: H.cudnn_attention(qn, kn, vn), budget_ms=600)
    g = layout.grid
    print(f"== {sname} {g.frames}x{g.height}x{g.width} H={heads}: cuDNN dense fwd {dense:.2f} ms", flush=True)
    found = {qb: H.threshold_for_density(q, k, layout, args.density, qb, "reference" if args.smoke else "auto")
             for qb in (64, 128)}
    srow: dict[str, Any] = {"dense_cudnn_fwd_ms": dense, "padded": layout.padded,
                            **{f"q{qb}_density": m.density for qb, (_, m) in found.items()}}
    if dev.type == "cuda":
        from nabla_attn.kernels.attention_ws import union_lists

        kept64 = found[64][1].kept
        # K/V blocks the 64-row Gluon forward loads per pair of rows, against the two lists' sum,
        # and the longer list of each pair against the mean (a program lasts as long as its longer list).
        counts64 = kept64.sum(-1)
        for tag, pairs in (("", layout.table("query_pairs", dev)), ("_adjacent", adjacent_pairs(kept64.shape[2], dev))):
            srow[f"q64_union_fraction{tag}"] = float(union_lists(kept64, pairs)[0].sum() / kept64.sum())
            two = counts64[..., pairs.clamp(min=0).long()] * (pairs >= 0)
            srow[f"q64_longer_over_mean{tag}"] = float(2 * two.max(-1).values.sum() / two.sum())
            print(f"  q64 pairs{tag or ' (layout)'}: union / lists {srow[f'q64_union_fraction{tag}']:.3f}, "
                  f"longer / mean {srow[f'q64_longer_over_mean{tag}']:.3f}", flush=True)
    srow.update(kernel_rows(q, k, v, {qb: m for qb, (_, m) in found.items()}, dense, names, args.errors))
    if not args.skip_mask:
        srow["mask"] = mask_lab(q, k, qn, kn, layout, {qb: thr for qb, (thr, _) in found.items()})
    return srow


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default kernel_lab.json; smoke runs: the temp dir)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--variants", default=",".join([*FWD, *BWD]), help="forward and backward variants to time")
    ap.add_argument("--skip-mask", action="store_true", help="kernels only")
    ap.add_argument("--errors", action="store_true", help="float64 errors of every forward variant (sampled rows)")
    ap.add_argument("--smoke", action="store_true", help="CPU: Triton interpreter, toy shapes")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(tempfile.gettempdir() if args.smoke else ".", "kernel_lab.json")
    if not torch.cuda.is_available() and not args.smoke:
        print("kernel_lab needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, head_dim = (torch.bfloat16, 128) if dev.type == "cuda" else (torch.float32, 16)
    shapes = {"wan14b_720p": ((21, 40, 80), 40), "wan14b_720p_diffusers": ((21, 45, 80), 40)}
    names = args.variants.split(",")
    if args.smoke:
        shapes = {"smoke": ((2, 8, 16), 1), "smoke_pad": ((2, 9, 10), 1)}
        names = ["triton_q64", "triton_q128", "gluon_q128", "q128"]
    result: dict[str, Any] = {**H.environment(dev), "density": args.density, "default_config": asdict(D0), "shapes": {}}
    for sname, (grid, heads) in shapes.items():
        result["shapes"][sname] = lab_shape(sname, TokenLayout(VideoGrid(*grid)), heads, head_dim, dtype, dev, names, args)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
