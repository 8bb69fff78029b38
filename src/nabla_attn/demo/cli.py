"""``nabla demo``: generate one clip with the bundled video DiT twice from the same noise, dense and
NABLA, and compare them (time, kept density per layer, PSNR, SSIM), writing a side-by-side video and
a picture of the block masks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, tuple[int, int, int]] = {
    # (frames, height, width) in pixels; patch (1, 2, 2) gives a T x H/2 x W/2 token grid.
    "small": (5, 48, 72),  # 5 x 24 x 36 = 4,320 tokens, 75 blocks: the CPU default
    "large": (9, 64, 96),  # 9 x 32 x 48 = 13,824 tokens, 216 blocks: the training size, for GPUs
}
DEFAULT_STEPS = {"small": 12, "large": 24}
# Shipped beside the bundled model and used by default at the small size: per-head thresholds from
# ``nabla calibrate --density 0.3`` and weights fine-tuned with those masks active
# (benchmarks/finetune_study.sh; docs/quality.md has what each buys).
BUNDLED_CALIBRATION = "tiny_wan_video.calibration.json"
BUNDLED_NABLA_WEIGHTS = "tiny_wan_video.nabla30.safetensors"
DEFAULT_THRESHOLD = 0.9


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .model import CLASS_NAMES

    p.add_argument("--clip", default="bikes", help=f"which training clip to generate: {', '.join(CLASS_NAMES)} (default bikes)")
    p.add_argument("--size", default="small", help="small (5x48x72 px, CPU default) or large (9x64x96 px, the training size; for GPUs)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 12 small, 24 large)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"one NABLA threshold for every layer, kept softmax mass in (0, 1] (default: the bundled calibration, "
                        f"else {DEFAULT_THRESHOLD})")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="per-layer thresholds and dense steps from a `nabla calibrate` file; 'none' for one threshold "
                        "(default: the calibration bundled with the model, if any)")
    p.add_argument("--sta-window", default=None, metavar="T,H,W", help="also keep an STA window in blocks, e.g. 1,3,3 (odd)")
    p.add_argument("--query-block", type=int, default=64, help="query block tokens, 64 or 128 (default 64)")
    p.add_argument("--dense-steps", type=int, default=None, help="first N steps run dense in the NABLA run too (default 0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", default="nabla_demo_out", help="output folder (default ./nabla_demo_out)")
    p.add_argument("--format", default="mp4", help="side-by-side video format: mp4 or gif (default mp4)")
    p.add_argument("--weights", default=None, help="a .safetensors file (its .json beside it) instead of the bundled model")
    p.add_argument("--nabla-weights", default=None, metavar="FILE",
                   help="weights for the NABLA run only, e.g. fine-tuned with NABLA active (training/finetune.py); "
                        "the dense run keeps the bundled model (or --weights). Default: the bundled fine-tuned "
                        "weights with the bundled calibration, else the dense run's; 'none' for the dense run's")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


class DemoError(ValueError):
    """A bad demo option; the message names the option and the value."""


def _parse_window(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise DemoError(f"--sta-window must be three odd integers like 1,3,3, got {text!r}") from None
    if len(vals) != 3 or any(v < 1 or v % 2 == 0 for v in vals):
        raise DemoError(f"--sta-window must be three positive odd integers like 1,3,3, got {text!r}")
    return vals  # type: ignore[return-value]


def parse_device(device: str | None) -> Any:
    """``--device``: a torch device that exists here (default: cuda if available, else cpu)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DemoError(f"--device {device!r} is not a torch device (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")
    return dev


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Check every option before any work; returns the resolved settings."""
    from .model import CLASS_NAMES

    if args.clip not in CLASS_NAMES:
        raise DemoError(f"--clip must be one of {', '.join(CLASS_NAMES)}, got {args.clip!r}")
    if args.size not in SIZES:
        raise DemoError(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    steps = DEFAULT_STEPS[args.size] if args.steps is None else args.steps
    if steps < 1 or steps > 1000:
        raise DemoError(f"--steps must be in 1..1000, got {steps}")
    if args.threshold is not None and not (0.0 < args.threshold <= 1.0):
        raise DemoError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.query_block not in (64, 128):
        raise DemoError(f"--query-block must be 64 or 128, got {args.query_block}")
    if args.dense_steps is not None and (args.dense_steps < 0 or args.dense_steps > steps):
        raise DemoError(f"--dense-steps must be in 0..{steps} (the step count), got {args.dense_steps}")
    if args.format not in ("mp4", "gif"):
        raise DemoError(f"--format must be mp4 or gif, got {args.format!r}")
    if args.threads is not None and args.threads < 1:
        raise DemoError(f"--threads must be >= 1, got {args.threads}")
    window = _parse_window(args.sta_window)
    dev = parse_device(args.device)
    if args.weights is not None and not Path(args.weights).is_file():
        raise DemoError(f"--weights {args.weights!r}: no such file")
    if args.nabla_weights not in (None, "none") and not Path(args.nabla_weights).is_file():
        raise DemoError(f"--nabla-weights {args.nabla_weights!r}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {args.out!r} exists and is not a folder")
    return {"steps": steps, "window": window, "device": dev, "out": out, **_mask_settings(args, window, steps)}


def _mask_settings(args: argparse.Namespace, window: tuple[int, int, int] | None, steps: int) -> dict[str, Any]:
    """The NABLA run's settings: a calibration file (explicit, or bundled and nothing else asked for)
    or one threshold. A calibration sets thresholds, window and dense steps itself, so combining it
    with those options is an error rather than a silent override."""
    from ..diffusers import NablaConfig
    from .model import assets_dir

    explicit = [o for o, v in (("--threshold", args.threshold), ("--sta-window", args.sta_window),
                               ("--dense-steps", args.dense_steps)) if v is not None]
    path: Path | None = None
    if args.calibration not in (None, "none"):
        path = Path(args.calibration)
        if explicit:
            raise DemoError(f"--calibration sets thresholds and dense steps itself; drop {', '.join(explicit)} "
                            "(or use --calibration none)")
        if not path.is_file():
            raise DemoError(f"--calibration {args.calibration!r}: no such file")
    elif args.calibration is None and not explicit and args.weights is None and args.size == "small" \
            and args.query_block == 64 and (assets_dir() / BUNDLED_CALIBRATION).is_file():
        path = assets_dir() / BUNDLED_CALIBRATION  # measured on the bundled model at this size
    nabla_weights = None if args.nabla_weights == "none" else args.nabla_weights
    if path == assets_dir() / BUNDLED_CALIBRATION and args.nabla_weights is None \
            and (assets_dir() / BUNDLED_NABLA_WEIGHTS).is_file():
        nabla_weights = str(assets_dir() / BUNDLED_NABLA_WEIGHTS)  # fine-tuned with exactly these masks
    if path is None:
        return {"calibration": None, "nabla_weights": nabla_weights, "config": NablaConfig(
            threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold, sta_window=window,
            dense_steps=args.dense_steps or 0, query_block=args.query_block)}
    try:
        config = NablaConfig.from_calibration(path, query_block=args.query_block)
    except (ValueError, FileNotFoundError) as exc:
        raise DemoError(f"--calibration: {exc}") from None
    if config.dense_steps > steps:
        raise DemoError(f"--calibration {path} keeps {config.dense_steps} steps dense, more than --steps {steps}")
    return {"calibration": path, "nabla_weights": nabla_weights, "config": config}


def _check_extras() -> None:
    missing = []
    for mod in ("diffusers", "safetensors", "numpy", "PIL", "matplotlib", "tqdm"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise DemoError(f"nabla demo needs {', '.join(missing)}: pip install 'nabla-attn[demo]'")


def run(args: argparse.Namespace) -> int:
    try:
        settings = validate(args)
        _check_extras()
    except DemoError as exc:
        print(f"nabla demo: error: {exc}", file=sys.stderr)
        return 2
    return _run(args, settings)


def _run(args: argparse.Namespace, s: dict[str, Any]) -> int:
    import torch
    from tqdm.auto import tqdm

    from .metrics import psnr, ssim
    from .model import CLASS_NAMES, MaskPolicy, flow_timesteps, load_bundled, sample
    from .video import plot_masks, side_by_side, write_video

    if args.threads:
        torch.set_num_threads(args.threads)
    device: torch.device = s["device"]
    out: Path = s["out"]
    out.mkdir(parents=True, exist_ok=True)
    frames, height, width = SIZES[args.size]
    steps: int = s["steps"]
    config = s["config"]
    calibration: Path | None = s["calibration"]
    options = {
        "clip": args.clip, "size": f"{args.size} ({frames} frames x {height}x{width} px)", "steps": steps,
        "calibration": None if calibration is None else str(calibration),
        "threshold": "per layer" if calibration else config.threshold, "sta_window": config.sta_window,
        "query_block": config.query_block, "dense_steps": config.dense_steps, "nabla_weights": s["nabla_weights"],
        "seed": args.seed, "device": str(device),
        "threads": torch.get_num_threads(),
    }
    print(f"nabla demo: output folder {out.resolve()}")
    print("options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    model = load_bundled(args.weights, device=device)
    if calibration is not None:
        policy, _ = MaskPolicy.from_calibration(calibration, model.config.num_layers)
        print(f"NABLA settings from the calibration {calibration.name} (nabla calibrate): per-layer thresholds "
              + " ".join(f"L{i}={'dense' if t is None else t}" for i, t in enumerate(policy.layer_thresholds or ()))
              + f", {config.dense_steps} dense steps")
    else:
        policy = MaskPolicy("nabla+sta" if config.sta_window else "nabla", threshold=config.threshold,
                            sta_window=config.sta_window, query_block=config.query_block)

    grid_t, grid_h, grid_w = frames, height // 2, width // 2
    print(f"model: {model.config.num_layers} layers x {model.config.num_attention_heads} heads of "
          f"{model.config.attention_head_dim}; token grid {grid_t}x{grid_h}x{grid_w} = {grid_t * grid_h * grid_w} tokens, "
          f"{grid_t * -(-grid_h // 8) * -(-grid_w // 8)} blocks of 64")
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(1, 3, frames, height, width, generator=gen).to(device)
    labels = torch.tensor([CLASS_NAMES.index(args.clip)], device=device)

    from ..diffusers import apply_nabla, remove_nabla

    model.set_attention(None)  # diffusers' own WanAttnProcessor: what apply_nabla patches

    # The NABLA run's model: the same one, or weights fine-tuned with NABLA active.
    nabla_weights: str | None = s["nabla_weights"]
    nabla_model = model if nabla_weights is None else load_bundled(nabla_weights, device=device)
    nabla_model.set_attention(None)
    if nabla_weights is not None:
        print(f"NABLA run uses {nabla_weights} (fine-tuned with sparse attention); the dense run keeps "
              f"{'the bundled model' if args.weights is None else args.weights}")

    def timed(name: str, on_step: Any = None, net: Any = model) -> tuple[torch.Tensor, float]:
        bar = tqdm(total=steps, desc=f"{name:>5}", unit="step", disable=args.no_progress, leave=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        video = sample(net, noise, labels, steps, progress=bar, on_step=on_step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bar.close()
        return video, time.perf_counter() - t0

    dense, t_dense = timed("dense")
    last_input: dict[str, torch.Tensor] = {}

    def keep_last(i: int, x: torch.Tensor) -> None:
        if i == steps - 1:
            last_input["x"] = x.clone()

    handle = apply_nabla(nabla_model.transformer, config)
    try:
        sparse, t_sparse = timed("nabla", keep_last, nabla_model)
        stats = handle.stats()
    finally:
        remove_nabla(handle)

    # Per-layer means over the sparse steps, in block order; a layer a calibration keeps dense has
    # no NABLA stats and counts as 1. "overall" averages every (layer, step), dense steps as 1 too.
    layers = [stats.mean.get(f"blocks.{i}.attn1", 1.0) for i in range(model.config.num_layers)]
    p = psnr(sparse, dense)
    ss = ssim(sparse[0].flatten(0, 1), dense[0].flatten(0, 1))
    sparse_steps = steps - config.dense_steps
    overall = (sum(layers) * sparse_steps + len(layers) * config.dense_steps) / (len(layers) * steps)
    speedup = t_dense / t_sparse
    verdict = (f"{speedup:.2f}x faster than" if round(speedup, 2) > 1 else
               f"{1 / speedup:.2f}x slower than" if round(1 / speedup, 2) > 1 else "as fast as")
    print(f"\ntime  dense {t_dense:6.1f} s   nabla {t_sparse:6.1f} s   ({steps} steps each, {device}): "
          f"NABLA {verdict} dense")
    if device.type == "cpu":
        from ..attention import select_backend

        backend = select_backend(torch.empty(1, 1, 1, model.config.attention_head_dim))
        print(f"      (NABLA attention ran on the {backend!r} backend, which beats dense SDPA on a CPU only below "
              "roughly 40% kept blocks; the rest of each step costs the same in both runs: docs/benchmarks.md, CPU)")
    print("kept density per layer (mean over sparse steps and heads): "
          + "  ".join(f"L{i}={d:.1%}" for i, d in enumerate(layers))
          + f"   overall {overall:.1%}" + (" (dense steps and layers counted as 100%)" if calibration or config.dense_steps else ""))
    print(f"NABLA vs dense, same noise:  PSNR {p:.2f} dB   SSIM {ss:.4f}")

    # The block masks of the last step, rebuilt from that step's input with the same settings.
    nabla_model.set_attention(policy)
    nabla_model.reset_stats(keep_masks=True)
    try:
        t_last = torch.full((1,), flow_timesteps(steps)[steps - 1], device=device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            nabla_model(last_input["x"], t_last, labels)
    finally:
        nabla_model.set_attention(None)

    ext = args.format
    video_path = write_video(side_by_side([dense[0], sparse[0]]), out / f"dense_vs_nabla.{ext}", fps=6)
    # Masks of the last sparse step (closest to the final video) for a few layers and heads.
    picks: dict[str, torch.Tensor] = {}
    n_layers = len(nabla_model.processors)
    for li in sorted({0, n_layers // 2, n_layers - 1}):
        proc = nabla_model.processors[li]
        if not proc.masks:
            continue
        last = proc.masks[-1]  # [H, Qb, Kb]
        for h in (0, last.shape[0] - 1):
            picks[f"layer {li} head {h}"] = last[h]
    mask_path = plot_masks(
        picks, out / "block_masks.png",
        f"NABLA block masks, last step ({'calibrated thresholds' if calibration else f'threshold {config.threshold}'}, grid {grid_t}x{grid_h}x{grid_w}: "
        f"{grid_t} frames x {-(-grid_h // 8)}x{-(-grid_w // 8)} tiles)",
    )
    summary = {
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "time_dense_s": t_dense, "time_nabla_s": t_sparse, "speedup": speedup, "density_per_layer": layers,
        "density": overall,
        "psnr_db": p, "ssim": ss,
        "files": {"video": str(video_path), "masks": str(mask_path)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {video_path} (left dense, right NABLA), {mask_path}, {out / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nabla demo", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
