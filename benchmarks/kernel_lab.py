"""Kernel lab (issue 3): time forward-kernel and mask-builder variants side by side on one card.

Not the user-facing benchmark (that is ``nabla bench``): this script answers "which variant is
faster, by how much" in one process, against the cuDNN dense forward measured in the same run.
Each variant's output is compared with the library default's (max abs difference), so a fast but
wrong variant shows at once. Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/kernel_lab.py --out lab.json
    PYTHONPATH=src python benchmarks/kernel_lab.py --smoke        # tiny sizes, any CUDA card
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nabla_attn import TokenLayout, VideoGrid  # noqa: E402
from nabla_attn.backends.triton_kernel import DEFAULT_CONFIG, triton_attention  # noqa: E402
from nabla_attn.bench import _dense_sdpa, masked_errors, structured_qkv, threshold_for_density, time_ms  # noqa: E402
from nabla_attn.kernels.mask_build import block_scores, pool_blocks_pair, table_from_scores  # noqa: E402

try:  # the previous row kernel, copied from git for a side-by-side timing (not part of the library)
    import _old_mask_build as OLD_MB  # type: ignore[import-not-found]
except ImportError:
    OLD_MB = None

D0 = DEFAULT_CONFIG
OLD = replace(D0, fold=False, mask_full_blocks=True, tma=False)  # the kernel of the previous session
FWD_VARIANTS = {
    "old": OLD,
    "plain": replace(D0, tma=False),
    "default": D0,
    "lazy": replace(D0, lazy_rescale=True),
    "lazy_prefetch": replace(D0, lazy_rescale=True, prefetch=True),
    "tma_s3": replace(D0, fwd_stages=3),
    "lazy_s3": replace(D0, lazy_rescale=True, fwd_stages=3),
    "tma_w8": replace(D0, fwd_warps=8),
    "lazy_w8": replace(D0, lazy_rescale=True, fwd_warps=8),
    "pad_branch": replace(D0, pad_branch=True),
    "lazy_pad_branch": replace(D0, lazy_rescale=True, pad_branch=True),
    # Warp-specialised Gluon forward (128-row tables; 64-row tables run the Triton kernel).
    "ws": replace(D0, warp_specialized=True),
    "ws_s2": replace(D0, warp_specialized=True, ws_stages=2),
    "ws_s4": replace(D0, warp_specialized=True, ws_stages=4),
    "ws_s5": replace(D0, warp_specialized=True, ws_stages=5),
    "ws_pair_s2": replace(D0, warp_specialized=True, ws_pair=True, ws_stages=2),
    "ws_pair_s3": replace(D0, warp_specialized=True, ws_pair=True, ws_stages=3),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernel_lab.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--variants", default=",".join(FWD_VARIANTS), help="forward variants to time")
    ap.add_argument("--skip-mask", action="store_true", help="forward variants only")
    ap.add_argument("--skip-fwd", action="store_true", help="mask variants only")
    ap.add_argument("--errors", action="store_true", help="errors vs float64 for every variant (sampled rows)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(0)
    shapes = {"wan14b_720p": ((21, 40, 80), 40), "wan14b_720p_diffusers": ((21, 45, 80), 40)}
    if args.smoke:
        shapes = {"smoke": ((3, 16, 24), 4), "smoke_pad": ((3, 13, 22), 4)}
    result: dict[str, Any] = {"card": card, "torch": torch.__version__, "density": args.density, "shapes": {}}
    for sname, (grid, heads) in shapes.items():
        layout = TokenLayout(VideoGrid(*grid), 0)
        q, k, v = structured_qkv(layout, heads, 128, torch.bfloat16, dev)
        scale = 1 / math.sqrt(128)
        dense = time_ms(lambda: _dense_sdpa(q, k, v), budget_ms=600)
        srow: dict[str, Any] = {"dense_cudnn_fwd_ms": dense, "padded": layout.tiled_len != layout.seq_len, "fwd": {}}
        print(f"== {sname} {grid} H={heads} on {card}: cuDNN dense fwd {dense:.2f} ms", flush=True)
        masks = {}
        for qb in (64, 128):
            thr, m = threshold_for_density(q, k, layout, args.density, qb)
            masks[qb] = m
            srow[f"q{qb}_density"] = m.density
        refs = {qb: triton_attention(q, k, v, masks[qb], scale, D0) for qb in (64, 128)}
        names = {} if args.skip_fwd else {n: FWD_VARIANTS[n] for n in args.variants.split(",")}
        for name, cfg in names.items():
            row: dict[str, Any] = {"config": asdict(cfg)}
            for qb in (64, 128):
                try:
                    f = lambda: triton_attention(q, k, v, masks[qb], scale, cfg)  # noqa: E731
                    out = f()
                    row[f"q{qb}_maxdiff"] = float((out.float() - refs[qb].float()).abs().max())
                    t = time_ms(f, budget_ms=300)
                    row[f"q{qb}_ms"] = t
                    row[f"q{qb}_speedup"] = dense / t
                    row[f"q{qb}_frac_ideal"] = dense * masks[qb].density / t
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a result
                    row[f"q{qb}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc(limit=2)
            if args.errors:
                for qb in (64, 128):
                    try:
                        out = triton_attention(q, k, v, masks[qb], scale, cfg)
                        e = masked_errors(q, k, v, masks[qb], {name: out}, scale, heads=2, rows=1024)
                        row[f"q{qb}_err_ratio"] = e[name]["ratio_vs_torch"]
                        row[f"q{qb}_err_rel"] = e[name]["rel"]
                        row[f"q{qb}_torch_rel"] = e["torch_sdpa_lowp"]["rel"]
                    except Exception as exc:  # noqa: BLE001
                        row[f"q{qb}_err_error"] = repr(exc)[:200]
            srow["fwd"][name] = row
            print(f"  {name:12s} " + "  ".join(
                f"q{qb}: {row[f'q{qb}_ms']:.2f} ms ({row[f'q{qb}_speedup']:.2f}x, {row[f'q{qb}_frac_ideal']:.0%} ideal, "
                f"diff {row[f'q{qb}_maxdiff']:.1e}, err x{row.get(f'q{qb}_err_ratio', float('nan')):.2f})" if f"q{qb}_ms" in row else f"q{qb}: {row.get(f'q{qb}_error', '')[:80]}"
                for qb in (64, 128)), flush=True)
        if not args.skip_mask:
            srow["mask"] = mask_lab(q, k, layout, args.density)
        result["shapes"][sname] = srow
        del q, k, v, masks, refs
        torch.cuda.empty_cache()
    result["choice"] = choose(result)
    print("choice:", result["choice"])
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


def mask_lab(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, density: float) -> dict[str, Any]:
    """Mask builder stages: pooling (warps), the score product (torch float32 vs tensor-core
    ``tf32x3`` / CUDA-core ``ieee`` kernels; table entries that differ from the table of float64
    scores), and the row kernel (previous vs current, warps), for 64- and 128-token query rows."""
    nv = layout.num_video_blocks
    qa, ka = pool_blocks_pair(q, k, layout, nv)
    thr64, _ = threshold_for_density(q, k, layout, density, 64)
    cut = float(torch.tensor(1.0 - thr64, dtype=torch.float32))
    mrow: dict[str, Any] = {"pool": {}, "scores": {}, "rows": {}}
    for w in (1, 2, 4):
        mrow["pool"][f"w{w}"] = time_ms(lambda: pool_blocks_pair(q, k, layout, nv, warps=w))
    exact = ((qa.double() @ ka.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])).float()
    truth, _ = table_from_scores(exact, layout, cut, None, 64)
    products = {
        "torch_fp32": lambda: (qa @ ka.transpose(-1, -2)) / math.sqrt(q.shape[-1]),
        "tf32x3": lambda: block_scores(qa, ka, "tf32x3"),
        "ieee": lambda: block_scores(qa, ka, "ieee"),
        "tf32": lambda: block_scores(qa, ka, "tf32"),
        "tf32x3_b128_w8": lambda: block_scores(qa, ka, "tf32x3", block=128, warps=8),
    }
    for name, f in products.items():
        try:
            sc = f()
        except Exception as exc:  # noqa: BLE001 - a variant that does not fit is a result
            mrow["scores"][name] = {"ms": float("nan"), "error": repr(exc)[:200], "entries_differ_vs_fp64_table": -1}
            continue
        kept, _ = table_from_scores(sc, layout, cut, None, 64)
        mrow["scores"][name] = {"ms": time_ms(f), "max_abs_vs_fp64": float((sc - exact).abs().max()),
                                "entries_differ_vs_fp64_table": int((kept != truth).sum())}
    scores = block_scores(qa, ka)
    for qb in (64, 128):
        base = None
        if OLD_MB is not None:
            f = lambda: OLD_MB.table_from_scores(scores, layout, cut, None, qb, write_lists=True)  # noqa: E731
            base, _ = f()
            mrow["rows"][f"old_q{qb}"] = {"ms": time_ms(f, budget_ms=200)}
        for warps in (1, 2, 4):
            f = lambda: table_from_scores(scores, layout, cut, None, qb, write_lists=True, row_warps=warps)  # noqa: E731
            got, _ = f()
            r: dict[str, Any] = {"ms": time_ms(f, budget_ms=200)}
            if base is not None:
                r["entries_differ_vs_old"] = int((got != base).sum())
            mrow["rows"][f"new_q{qb}_w{warps}"] = r
    from nabla_attn.bench import fast_mask

    for qb in (64, 128):
        mrow[f"total_q{qb}_ms"] = time_ms(lambda: fast_mask(q, k, layout, thr64, qb))
    print("  mask: pool " + ", ".join(f"{n} {t:.3f}" for n, t in mrow["pool"].items())
          + " | scores " + ", ".join(f"{n} {r['ms']:.3f} ({r['entries_differ_vs_fp64_table']} differ)" for n, r in mrow["scores"].items())
          + " | rows " + ", ".join(f"{n} {r['ms']:.3f}" for n, r in mrow["rows"].items())
          + f" | total q64 {mrow['total_q64_ms']:.3f} q128 {mrow['total_q128_ms']:.3f} ms", flush=True)
    return mrow


def choose(result: dict[str, Any]) -> dict[str, Any]:
    """The fastest variant (sum of the 64- and 128-row table times) on the unpadded shape, plus
    ``pad_branch`` if it wins on the padded one; as fields that differ from the library default."""
    shapes = list(result["shapes"].values())
    if any(n not in shapes[0]["fwd"] for n in FWD_VARIANTS):
        return {"variant": "default", "fields": {}, "env": ""}

    def total(row: dict[str, Any]) -> float:
        return row.get("q64_ms", float("inf")) + row.get("q128_ms", float("inf"))

    base = shapes[0]["fwd"]
    name = min((n for n in base if n != "old"), key=lambda n: total(base[n]))
    cfg = dict(base[name]["config"])
    if len(shapes) > 1:
        pad = shapes[1]["fwd"]
        with_b = replace(D0, **{**cfg, "pad_branch": True})
        match = [n for n, r in pad.items() if r["config"] == asdict(with_b)]
        same = [n for n, r in pad.items() if r["config"] == cfg]
        if match and same and total(pad[match[0]]) < total(pad[same[0]]):
            cfg["pad_branch"] = True
    diff = {k: v for k, v in cfg.items() if asdict(D0)[k] != v}
    return {"variant": name, "fields": diff,
            "env": ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in diff.items())}


if __name__ == "__main__":
    main()
