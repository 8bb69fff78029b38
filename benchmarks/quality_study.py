"""Quality of sparse self-attention on the bundled trained video DiT: NABLA vs STA vs NABLA+STA vs
random block masks, at matched kept densities, against dense attention from the same noise.

For every method and setting, all three clips are generated in one batch from the same noise as the
dense run, and we record:
  * PSNR / SSIM of the final videos against the dense videos;
  * every layer's relative error ``||O_sparse - O_dense|| / ||O_dense||`` of the attention output,
    both computed on the same q, k, v (the sparse run's own trajectory), per sampling step;
  * kept density per layer and step.
NABLA is also run with 128-token query blocks (two tiles share one key list).

    PYTHONPATH=src python benchmarks/quality_study.py --size small --out benchmarks/results/quality_small.json
    python benchmarks/quality_study.py --plot benchmarks/results/quality_small.json   # figures + table
    PYTHONPATH=src python benchmarks/quality_study.py --smoke    # every method once, 2 steps, files in /tmp

Runs on CPU (small size, ~10 minutes on 2 cores) or on a GPU (``--device cuda``, any size).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nabla_attn.demo.cli import SIZES  # noqa: E402
from nabla_attn.demo.metrics import psnr, ssim  # noqa: E402
from nabla_attn.demo.model import CLASS_NAMES, MaskPolicy, load_bundled, sample  # noqa: E402
from nabla_attn.demo.policy_spec import parse_policy  # noqa: E402
from nabla_attn.grid import VideoGrid  # noqa: E402
from nabla_attn.masks import sta_mask  # noqa: E402

TARGETS = (0.10, 0.20, 0.30)


def sta_density(grid: VideoGrid, window: tuple[int, int, int]) -> float:
    return sta_mask(grid, window).density


def pick_sta_windows(grid: VideoGrid) -> list[tuple[int, int, int]]:
    """Odd windows whose exact density is nearest to each target (plus neighbours for the curve)."""
    T, R, C = grid.block_grid
    cands = {(t, r, c) for t in range(1, 2 * T, 2) for r in range(1, 2 * R, 2) for c in range(1, 2 * C, 2)}
    scored = sorted((sta_density(grid, w), w) for w in cands)
    chosen: list[tuple[int, int, int]] = []
    for target in (0.05,) + TARGETS + (0.45,):
        # Among windows near the target, prefer the most isotropic one (what STA would use).
        near = sorted(scored, key=lambda dw: (round(abs(dw[0] - target), 2), max(dw[1]) - min(dw[1])))
        w = near[0][1]
        if w not in chosen:
            chosen.append(w)
    return chosen


def run_policy(model: Any, noise: torch.Tensor, labels: torch.Tensor, steps: int, policy: MaskPolicy | None,
               dense_steps: int = 0) -> tuple[torch.Tensor, dict[str, Any], float]:
    """Sample with ``policy`` (dense for the first ``dense_steps`` steps). Per layer and step: kept
    density and attention-output error; dense steps and dense layers count as density 1, error 0."""

    def on_step(i: int, x: torch.Tensor) -> None:
        model.set_attention(policy if i >= dense_steps else None)

    model.reset_stats(record_error=policy is not None)
    t0 = time.perf_counter()
    video = sample(model, noise, labels, steps, on_step=on_step)
    dt = time.perf_counter() - t0
    model.set_attention(None)
    per_layer: dict[str, Any] = {"density": [], "rel_error": []}  # [layer][step]
    for proc in model.processors:
        pad = [1.0] * dense_steps if policy is not None else []
        per_layer["density"].append(pad + [st.density for st in proc.stats])
        per_layer["rel_error"].append([0.0] * len(pad) + [st.rel_error for st in proc.stats])
    return video, per_layer, dt


def parse_runs(text: str, num_layers: int) -> list[tuple[str, MaskPolicy, int, str | None, str]]:
    """``--runs``: ``[NAME=]POLICY[@WEIGHTS]`` separated by ';' -> (method, policy, dense steps,
    weights, spec). POLICY as training/finetune.py's --mask; WEIGHTS: fine-tuned weights used for
    the sparse run (the dense reference stays the bundled model); NAME defaults to the policy kind
    (``calibrated`` for calibration files), with " ft" appended when WEIGHTS is given."""
    out = []
    for spec in filter(None, (t.strip() for t in text.split(";"))):
        name, _, rest = spec.rpartition("=") if "=" in spec.split(":")[0] else ("", "", spec)
        policy_text, _, weights = rest.partition("@")
        policy, dense_steps = parse_policy(policy_text, num_layers)
        if policy is None:
            raise SystemExit(f"--runs {spec!r}: 'dense' is the reference, not a run")
        kind = policy_text.split(":")[0]
        if kind == "calibrated":  # per-head files (calibrate's default where it pays) vs per-layer ones
            per_head = any(isinstance(t, tuple) for t in policy.layer_thresholds or ())
            kind = "calibrated" + ("+sta" if policy.sta_window else "") + ("" if per_head else " per-layer")
        out.append((name or (kind + (" ft" if weights else "")), policy, dense_steps, weights or None, spec))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON results path (default benchmarks/results/quality_<size>.json)")
    ap.add_argument("--thresholds", default="0.5,0.7,0.85,0.95")
    ap.add_argument("--combo-window", default="1,3,3", help="STA window unioned with NABLA for nabla+sta")
    ap.add_argument("--sta-windows", default=None, help="STA windows to run, e.g. '3,3,3;1,3,5' (default: picked per target density)")
    ap.add_argument("--append", action="store_true", help="add to the results already in --out (same size, steps, seed)")
    ap.add_argument("--methods", default="nabla,nabla q128,sta,nabla+sta,random", help="comma-separated subset")
    ap.add_argument("--weights", default=None, help="a .safetensors file instead of the bundled model")
    ap.add_argument("--runs", default=None, help="instead of --methods: '[NAME=]POLICY[@WEIGHTS];...' (see parse_runs)")
    ap.add_argument("--plot", default=None, metavar="JSON", help="only draw figures and the table from a results file")
    ap.add_argument("--smoke", action="store_true", help="check the script: 2 steps, one setting per method, output in /tmp")
    args = ap.parse_args()
    img = None
    if args.smoke:
        args.size, args.steps, args.thresholds, args.sta_windows = "small", 2, "0.7", "1,3,3"
        img = Path(tempfile.gettempdir()) / "quality_smoke"
        args.out = args.out or str(img / "quality_smoke.json")
    if args.plot:
        plot(Path(args.plot))
        return

    device = torch.device(args.device)
    model = load_bundled(args.weights, device=device)
    frames, height, width = SIZES[args.size]
    grid = VideoGrid(frames, height // 2, width // 2)
    gen = torch.Generator().manual_seed(args.seed)
    n = 1 if args.smoke else len(CLASS_NAMES)  # a smoke run generates one clip
    noise = torch.randn(n, 3, frames, height, width, generator=gen).to(device)
    labels = torch.arange(n, device=device)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.sta_windows:
        windows = [tuple(int(v) for v in w.split(",")) for w in args.sta_windows.split(";")]  # type: ignore[misc]
    else:
        windows = pick_sta_windows(grid)
    # NABLA+STA: NABLA's blocks plus the immediate spatial neighbours in the same frame, which
    # cover the tokens at tile borders that mean-pooled block scores miss.
    combo_window = tuple(int(v) for v in args.combo_window.split(","))
    methods = set(args.methods.split(","))

    policies: list[tuple[str, MaskPolicy]] = []
    policies += [("nabla", MaskPolicy("nabla", threshold=t)) for t in thresholds]
    policies += [("nabla q128", MaskPolicy("nabla", threshold=t, query_block=128)) for t in thresholds]
    policies += [("sta", MaskPolicy("sta", threshold=None, sta_window=w)) for w in windows]
    policies += [("nabla+sta", MaskPolicy("nabla+sta", threshold=t, sta_window=combo_window)) for t in thresholds]  # type: ignore[arg-type]
    policies += [("random", MaskPolicy("random", threshold=None, density=d, seed=args.seed)) for d in TARGETS]
    policies = [(m, p) for m, p in policies if m in methods]
    if args.smoke:  # one setting per method
        policies = [(m, p) for i, (m, p) in enumerate(policies) if m not in (x for x, _ in policies[:i])]
    # (method, policy, dense steps, weights of the sparse run, spec)
    runs: list[tuple[str, MaskPolicy, int, str | None, str]] = [(m, p, 0, None, p.label()) for m, p in policies]
    if args.runs:
        runs = parse_runs(args.runs, model.config.num_layers)

    out = Path(args.out or Path(__file__).parent / "results" / f"quality_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    dense, _, t_dense = run_policy(model, noise, labels, args.steps, None)
    meta = {"size": args.size, "video": [frames, height, width], "grid": [grid.frames, grid.height, grid.width],
            "blocks": grid.num_blocks, "block_grid": list(grid.block_grid), "steps": args.steps, "seed": args.seed,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
            "clips": list(CLASS_NAMES)[:n], "model": json.loads(model.config.to_json()), "dense_time_s": t_dense}
    print(f"dense: {t_dense:.1f}s  grid {grid.frames}x{grid.height}x{grid.width} ({grid.num_blocks} blocks), {args.device}")
    results: list[dict[str, Any]] = []
    if args.append and out.exists():
        previous = json.loads(out.read_text())
        if previous["meta"]["size"] != args.size or previous["meta"]["steps"] != args.steps or previous["meta"]["seed"] != args.seed:
            raise SystemExit(f"--append: {out} was made with other size/steps/seed: {previous['meta']}")
        results = previous["results"]
    tuned: dict[str, Any] = {}
    for method, pol, dense_steps, weights, spec in runs:
        runner = model
        if weights:
            runner = tuned.get(weights) or tuned.setdefault(weights, load_bundled(weights, device=device))
        video, per_layer, dt = run_policy(runner, noise, labels, args.steps, pol, dense_steps)
        label = pol.label() + (f" +{dense_steps} dense steps" if dense_steps else "") + (" ft" if weights else "")
        dens = torch.tensor(per_layer["density"])  # [layers, steps]
        err = torch.tensor(per_layer["rel_error"])
        rec = {
            "method": method, "label": label, "threshold": pol.threshold, "sta_window": pol.sta_window,
            "random_p": pol.density, "query_block": pol.query_block, "dense_steps": dense_steps,
            "layer_thresholds": pol.layer_thresholds, "weights": weights, "spec": spec,
            "density": float(dens.mean()), "density_per_layer": dens.mean(1).tolist(), "density_per_step": dens.mean(0).tolist(),
            "density_layer_step": per_layer["density"],
            "rel_error": float(err.mean()), "rel_error_per_layer": err.mean(1).tolist(), "rel_error_per_step": err.mean(0).tolist(),
            "psnr_db": psnr(video, dense), "ssim": ssim(video.flatten(0, 2), dense.flatten(0, 2)),
            "psnr_per_clip": [psnr(video[i], dense[i]) for i in range(n)],
            "ssim_per_clip": [ssim(video[i].flatten(0, 1), dense[i].flatten(0, 1)) for i in range(n)],
            "time_s": dt,
        }
        results.append(rec)
        # Written after every setting, so a run cut short still leaves its results.
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"{label:42s} density {rec['density']:.3f}  rel.err {rec['rel_error']:.3f}  "
              f"PSNR {rec['psnr_db']:6.2f}  SSIM {rec['ssim']:.4f}  ({dt:.0f}s)", flush=True)

    print(f"wrote {out}")
    plot(out, img)


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best value reached at or below each density (so a method is credited with its best
    setting, e.g. STA's best window, when several settings land near the same density)."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return best


def best_at(points: list[tuple[float, float]], x: float, slack: float = 0.015) -> float | None:
    """Best y among settings whose density is at most ``x + slack`` (None if no setting is that sparse).

    No interpolation: every number in the table was measured at a setting no denser than the target.
    """
    ys = [y for d, y in points if d <= x + slack]
    return max(ys) if ys else None


def plot(path: Path, img: Path | None = None) -> None:
    """Figures into ``img`` (default docs/img) and the markdown tables beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    meta, results = data["meta"], data["results"]
    img = img or Path(__file__).resolve().parents[1] / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    tag = path.stem  # quality_small.json -> docs/img/quality_small_*.png
    methods = list(dict.fromkeys(r["method"] for r in results))
    style = {"nabla": "o-", "nabla q128": "s--", "sta": "^-", "nabla+sta": "D-", "random": "x:", "calibrated": "*-",
             "calibrated per-layer": "v-", "calibrated+sta": "P-"}
    style.update({f"{m} ft": v.replace("-", "--", 1) if "--" not in v else v for m, v in list(style.items())})

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in methods:
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["density"])
        xs = [r["density"] * 100 for r in rs]
        for ax, key in ((axes[0], "psnr_db"), (axes[1], "ssim")):
            # Every setting as a marker; the line follows the method's best value up to each density.
            line = ax.plot(*zip(*front([(x, r[key]) for x, r in zip(xs, rs)])), style.get(m, "o-"), label=m)[0]
            ax.scatter(xs, [r[key] for r in rs], s=12, color=line.get_color(), alpha=0.5)
        err_front = [(x, -e) for x, e in front([(x, -r["rel_error"]) for x, r in zip(xs, rs)])]
        line = axes[2].plot(*zip(*err_front), style.get(m, "o-"), label=m)[0]
        axes[2].scatter(xs, [r["rel_error"] for r in rs], s=12, color=line.get_color(), alpha=0.5)
    for ax, name in zip(axes, ("PSNR vs dense (dB)", "SSIM vs dense", "attention output rel. error (mean; line = best so far)")):
        ax.set_xlabel("kept block density (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend()
    g = meta["grid"]
    fig.suptitle(f"Trained tiny Wan DiT, {meta['video'][0]}x{meta['video'][1]}x{meta['video'][2]} px "
                 f"(grid {g[0]}x{g[1]}x{g[2]}, {meta['blocks']} blocks), {meta['steps']} steps, 3 clips")
    fig.tight_layout()
    fig.savefig(img / f"{tag}_curves.png", dpi=100)
    plt.close(fig)

    # Per layer: density and error for the NABLA setting nearest 20% and the STA window nearest 20%.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        r = min(rs, key=lambda r: abs(r["density"] - 0.2))
        axes[0].plot(r["density_per_layer"], style.get(m, "o-"), label=f"{r['label']} ({r['density']:.0%})")
        axes[1].plot(r["rel_error_per_layer"], style.get(m, "o-"), label=r["label"])
        if m.startswith(("nabla", "calibrated")):
            axes[2].plot(r["density_per_step"], style.get(m, "o-"), label=r["label"])
    axes[0].set_title("kept density per layer (near 20%)")
    axes[1].set_title("attention rel. error per layer")
    axes[1].set_yscale("log")
    axes[2].set_title("NABLA kept density per sampling step")
    axes[0].set_xlabel("layer")
    axes[1].set_xlabel("layer")
    axes[2].set_xlabel("step (0 = pure noise)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / f"{tag}_layers.png", dpi=100)
    plt.close(fig)

    # Table: best measured PSNR / SSIM at or below each target density.
    lines = ["| method (best setting at density <= target + 1.5 pts) | " + " | ".join(f"PSNR @ {t:.0%}" for t in TARGETS) + " | "
             + " | ".join(f"SSIM @ {t:.0%}" for t in TARGETS) + " |",
             "|---|" + "---|" * (2 * len(TARGETS))]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        ps = [best_at([(r["density"], r["psnr_db"]) for r in rs], t) for t in TARGETS]
        ss = [best_at([(r["density"], r["ssim"]) for r in rs], t) for t in TARGETS]
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {m} | " + " | ".join(fmt(p, ".2f") for p in ps) + " | " + " | ".join(fmt(s, ".4f") for s in ss) + " |")
    lines.append("")
    lines.append("| setting | density | PSNR (dB) | SSIM | rel. error | PSNR per clip |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        lines.append(f"| {r['label']}{' q128' if r['query_block'] == 128 else ''} | {r['density']:.1%} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.4f} | {r['rel_error']:.3f} | {' / '.join(f'{p:.1f}' for p in r['psnr_per_clip'])} |")
    table = "\n".join(lines)
    (path.with_suffix(".md")).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
