"""``nabla calibrate``: choose per-layer NABLA thresholds for the bundled video DiT at a kept-block
budget (:func:`nabla_attn.calibrate` on the demo model), write the JSON that
``NablaConfig.from_calibration`` (and ``nabla demo --calibration``) loads, and a plot of error vs
density per layer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli import DEFAULT_STEPS, SIZES, DemoError, _parse_window, parse_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--density", type=float, default=None, help="target mean kept fraction in (0, 1] (default 0.2)")
    p.add_argument("--error", type=float, default=None, help="instead: target mean relative attention error (> 0)")
    p.add_argument("--thresholds", default="0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
                   help="threshold grid every layer chooses from (comma-separated)")
    p.add_argument("--sta-window", default=None, metavar="T,H,W", help="union every candidate with this STA window (NABLA+STA)")
    p.add_argument("--max-dense-steps", type=int, default=None, help="most dense first steps to consider (default: a quarter of --steps)")
    p.add_argument("--no-dense-layers", action="store_true", help="every layer stays sparse")
    p.add_argument("--query-stride", type=int, default=4,
                   help="measure every n-th query token (default 4: an unbiased estimate, 4x cheaper on CPU)")
    p.add_argument("--clips", default="all", help="calibration clips: all, or comma-separated names (default all)")
    p.add_argument("--size", default="small", help="small (CPU default) or large")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 12 small, 24 large)")
    p.add_argument("--seed", type=int, default=1, help="noise seed of the calibration samples (default 1; the demo uses 0)")
    p.add_argument("--weights", default=None, help="a .safetensors file (its .json beside it) instead of the bundled model")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--out", default="nabla_calibration.json", help="JSON output (default ./nabla_calibration.json)")
    p.add_argument("--plot", default=None, help="PNG of error vs density per layer (default: the --out path with .png)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def validate(args: argparse.Namespace) -> dict[str, Any]:
    from .model import CLASS_NAMES

    if args.density is not None and args.error is not None:
        raise DemoError("give --density or --error, not both")
    density = 0.2 if args.density is None and args.error is None else args.density
    if density is not None and not (0.0 < density <= 1.0):
        raise DemoError(f"--density must be in (0, 1], got {density}")
    if args.error is not None and not (args.error > 0.0):
        raise DemoError(f"--error must be > 0, got {args.error}")
    try:
        thresholds = [float(t) for t in args.thresholds.split(",")]
    except ValueError:
        raise DemoError(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}") from None
    if not thresholds or any(not (0.0 < t <= 1.0) for t in thresholds):
        raise DemoError(f"--thresholds must be numbers in (0, 1], got {args.thresholds!r}")
    if args.size not in SIZES:
        raise DemoError(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    steps = DEFAULT_STEPS[args.size] if args.steps is None else args.steps
    if not (1 <= steps <= 1000):
        raise DemoError(f"--steps must be in 1..1000, got {steps}")
    if args.max_dense_steps is not None and not (0 <= args.max_dense_steps < steps):
        raise DemoError(f"--max-dense-steps must be in 0..{steps - 1}, got {args.max_dense_steps}")
    clips = list(CLASS_NAMES) if args.clips == "all" else args.clips.split(",")
    bad = [c for c in clips if c not in CLASS_NAMES]
    if bad or not clips:
        raise DemoError(f"--clips must be 'all' or names from {', '.join(CLASS_NAMES)}, got {args.clips!r}")
    if args.threads is not None and args.threads < 1:
        raise DemoError(f"--threads must be >= 1, got {args.threads}")
    if args.query_stride < 1:
        raise DemoError(f"--query-stride must be >= 1, got {args.query_stride}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise DemoError(f"--weights {args.weights!r}: no such file")
    out = Path(args.out)
    if out.is_dir():
        raise DemoError(f"--out {args.out!r} is a folder; give a .json file path")
    dev = parse_device(args.device)
    return {"density": density, "thresholds": thresholds, "window": _parse_window(args.sta_window), "steps": steps,
            "clips": clips, "device": dev, "out": out,
            "plot": Path(args.plot) if args.plot else out.with_suffix(".png")}


def run(args: argparse.Namespace) -> int:
    try:
        s = validate(args)
        import diffusers  # noqa: F401
    except DemoError as exc:
        print(f"nabla calibrate: error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("nabla calibrate: error: needs diffusers, safetensors, matplotlib, tqdm: pip install 'nabla-attn[demo]'",
              file=sys.stderr)
        return 2
    import torch

    from ..diffusers.calibration import calibrate
    from .model import CLASS_NAMES, load_bundled, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    frames, height, width = SIZES[args.size]
    model = load_bundled(args.weights, device=s["device"])
    model.set_attention(None)  # diffusers' own processor: what calibrate patches
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(s["clips"]), 3, frames, height, width, generator=gen).to(s["device"])
    labels = torch.tensor([CLASS_NAMES.index(c) for c in s["clips"]], device=s["device"])
    print(f"nabla calibrate: {len(s['clips'])} clips ({', '.join(s['clips'])}) x {s['steps']} steps at "
          f"{frames}x{height}x{width} px, {len(s['thresholds'])} thresholds"
          + (f" + STA {s['window']}" if s["window"] else "") + f", target "
          + (f"mean kept {s['density']:.0%}" if s["density"] is not None else f"mean error {args.error}"))
    # One input: the clips as one batch through the whole sampler (errors sum over the batch).
    cal = calibrate(
        model.transformer, [lambda: sample(model, noise, labels, s["steps"])],
        density=s["density"], error=args.error, thresholds=s["thresholds"], sta_window=s["window"],
        max_dense_steps=args.max_dense_steps, dense_layers=not args.no_dense_layers, query_stride=args.query_stride,
        out=s["out"], plot=s["plot"], progress=not args.no_progress,
    )  # fmt: skip
    print(cal.summary())
    print(f"wrote {s['out']} and {s['plot']}; use it with NablaConfig.from_calibration({str(s['out'])!r}) "
          f"or nabla demo --calibration {s['out']}")
    return 0
