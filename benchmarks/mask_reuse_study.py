"""Mask reuse across denoising steps (``NablaConfig.mask_reuse_steps`` / ``mask_reuse_tolerance``) on
the bundled video DiT at the demo size: sampling time and PSNR/SSIM against dense, for several
reuse settings on top of one NABLA setting, through ``apply_nabla`` (the demo's path).

    PYTHONPATH=src python benchmarks/mask_reuse_study.py --threshold 0.5 --repeats 2
    PYTHONPATH=src python benchmarks/mask_reuse_study.py --calibration nabla_calibration.json

Times are medians over ``--repeats`` runs, the settings interleaved (so a busy machine slows all of
them alike); each run also counts the tables built and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nabla_attn.demo.cli import SIZES  # noqa: E402
from nabla_attn.demo.metrics import psnr, ssim  # noqa: E402
from nabla_attn.demo.model import CLASS_NAMES, load_bundled, sample  # noqa: E402
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla  # noqa: E402

SETTINGS = ((1, None), (2, None), (3, None), (4, None), (6, None), (4, 0.05), (6, 0.1), (12, 0.1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--calibration", default=None, help="a nabla calibrate file instead of --threshold")
    ap.add_argument("--clip", default="bikes")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default=None, help="'k[:tol];...' (default: a sweep)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mask_reuse_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings: list[tuple[int, float | None]] = list(SETTINGS)
    if args.settings:
        settings = [(int(a), float(b) if b else None) for a, _, b in (s.partition(":") for s in args.settings.split(";"))]
    base = NablaConfig.from_calibration(args.calibration) if args.calibration else NablaConfig(threshold=args.threshold)
    model = load_bundled()
    model.set_attention(None)
    frames, height, width = SIZES[args.size]
    noise = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(args.seed))
    labels = torch.tensor([CLASS_NAMES.index(args.clip)])

    def timed(config: NablaConfig | None) -> tuple[torch.Tensor, float, dict[str, Any]]:
        handle = apply_nabla(model.transformer, config) if config is not None else None
        try:
            t0 = time.perf_counter()
            video = sample(model, noise, labels, args.steps)
            dt = time.perf_counter() - t0
            info: dict[str, Any] = {}
            if handle is not None:
                stats = handle.stats()
                # Mean kept fraction over every (layer, step); dense layers and steps count as 1.
                n_layers = model.config.num_layers
                sparse_steps = args.steps - config.dense_steps
                per_layer = [stats.mean.get(f"blocks.{i}.attn1", 1.0) for i in range(n_layers)]
                info["density"] = (sum(per_layer) * sparse_steps + n_layers * config.dense_steps) / (n_layers * args.steps)
                caches = [getattr(b.attn1.processor, "_reuse_cache", None) for b in model.transformer.blocks]
                info["tables_built"] = sum(c.built for c in caches if c is not None)
                info["tables_reused"] = sum(c.reused for c in caches if c is not None)
        finally:
            if handle is not None:
                remove_nabla(handle)
        return video, dt, info

    dense, _, _ = timed(None)
    configs = {f"k={k}" + (f",tol={tol}" if tol else ""): NablaConfig(
        **{**base.__dict__, "mask_reuse_steps": k, "mask_reuse_tolerance": tol}) for k, tol in settings}
    times: dict[str, list[float]] = {name: [] for name in configs}
    times["dense"] = []
    results: dict[str, dict[str, Any]] = {}
    for rep in range(args.repeats):
        for name, config in [("dense", None), *configs.items()]:
            video, dt, info = timed(config)
            times[name].append(dt)
            if rep == 0:
                results[name] = {"psnr_db": psnr(video, dense), "ssim": ssim(video[0].flatten(0, 1), dense[0].flatten(0, 1)),
                                 **info, "video": video}
            print(f"rep {rep} {name:14s} {dt:6.1f} s  " + ("" if name == "dense" else
                  f"PSNR {results[name]['psnr_db']:6.2f}  kept {info['density']:.1%}  "
                  f"built {info['tables_built']} reused {info['tables_reused']}"), flush=True)
    no_reuse = results[next(iter(configs))]["video"]
    rows = []
    for name in ["dense", *configs]:
        r = results[name]
        video = r.pop("video")
        rows.append({"setting": name, "median_s": statistics.median(times[name]), "times_s": times[name],
                     **({} if name == "dense" else {**r, "psnr_vs_no_reuse_db": psnr(video, no_reuse)})})
    meta = {"base": {k: (list(v) if isinstance(v, tuple) else v) for k, v in base.__dict__.items()
                     if k in ("threshold", "sta_window", "dense_steps")},
            "calibration": args.calibration, "clip": args.clip, "size": args.size, "steps": args.steps, "seed": args.seed,
            "threads": args.threads, "device": "cpu", "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.out}")
    for row in rows:
        print(f"| {row['setting']} | {row['median_s']:.1f} s | " + ("" if row["setting"] == "dense" else
              f"{row['density']:.1%} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['psnr_vs_no_reuse_db']:.2f} | "
              f"{row['tables_built']} / {row['tables_reused']} |"))


if __name__ == "__main__":
    main()
