"""NABLA on a CPU (issue 15): the public op on 2 threads against dense SDPA, the eager reference
backend against the ``cpu`` backend, and the bundled demo's sampling run.

**Op.** ``nabla_attention(q, k, v, grid, threshold, backend=...)`` on natural-order q, k, v in the
``[B, S, H, D]`` memory diffusers' processors hand over (viewed as ``[B, H, S, D]``), tiling, the
mask, the attention and untiling inside the timed call; dense is PyTorch's SDPA on the same tensors.
q and k are structured (``harness.structured_qkv``: local attention with per-head length scales), the
threshold is bisected to each kept density. Shapes: the demo's (5x24x36 tokens, 4 heads, head_dim 64)
and a bigger one (9x32x48, 8 heads). ``--flex`` adds compiled FlexAttention (CPU forward) at the
demo's shape.

**Demo** (``--demo``): the bundled model's 12-step sampling at the demo's size, dense and NABLA with
the calibration ``--calibration`` (per-head thresholds), NABLA once per backend.

The machine may be shared: every round times each variant once, in turn, and the table reports
medians; the load average is recorded beside the numbers. Results: ``--out`` (JSON) and a table.

    PYTHONPATH=src python benchmarks/bench_cpu.py --out benchmarks/results/cpu_2cores.json
    PYTHONPATH=src python benchmarks/bench_cpu.py --demo --out benchmarks/results/cpu_2cores.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

from nabla_attn import TokenLayout, VideoGrid, nabla_attention, tile  # noqa: E402

SHAPES: dict[str, tuple[tuple[int, int, int], int, int]] = {
    # name: (token grid, heads, rounds)
    "demo": ((5, 24, 36), 4, 9),
    "bigger": ((9, 32, 48), 8, 5),
}
HEAD_DIM = 64
DENSITIES = (0.1, 0.2, 0.3, 0.5)
BACKENDS = ("reference", "cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the results here (JSON); merged into an existing file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    p.add_argument("--rounds", type=int, default=None, help="rounds per point (default: per shape)")
    p.add_argument("--flex", action="store_true", help="also compiled FlexAttention at the demo's shape")
    p.add_argument("--demo", action="store_true", help="time the demo's sampling instead of the op")
    p.add_argument("--calibration", default="benchmarks/results/calibration/small_30.json")
    p.add_argument("--demo-rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that the script runs")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "blas": "MKL" if torch.backends.mkl.is_available() else "other"}


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Each round times every variant once, in turn (after one warm-up call each): seconds."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts)} for name, ts in times.items()}


def op_point(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: VideoGrid, thr: float, rounds: int,
             flex: bool) -> dict[str, Any]:
    variants: dict[str, Callable[[], Any]] = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name in BACKENDS + (("flex",) if flex else ()):
        variants[name] = lambda name=name: nabla_attention(q, k, v, grid, thr, backend=name)  # type: ignore[misc]
    with torch.no_grad():
        outs = {name: variants[name]() for name in variants if name != "dense"}
        timing = interleaved(variants, rounds)
    ref = outs["reference"].double()
    errors = {name: float((o.double() - ref).norm() / ref.norm()) for name, o in outs.items() if name != "reference"}
    return {"times": timing, "rel_err_vs_reference": errors}


def run_op(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    shapes = {"smoke": ((2, 9, 20), 2, 1)} if args.smoke else {n: SHAPES[n] for n in args.shapes.split(",")}
    for name, (dims, heads, rounds) in shapes.items():
        grid = VideoGrid(*dims)
        layout = TokenLayout(grid)
        q, k, v = (H.bshd(x) for x in H.structured_qkv(layout, heads, HEAD_DIM, torch.float32, torch.device("cpu")))
        qt, kt = tile(q, layout), tile(k, layout)
        rows = []
        for target in (float(d) for d in args.densities.split(",")):
            thr, mask = H.threshold_for_density(qt, kt, layout, target, 64, "reference")
            load = os.getloadavg()[0]
            point = op_point(q, k, v, grid, thr, args.rounds or rounds, args.flex and name in ("demo", "smoke"))
            rows.append({"target_density": target, "density": mask.density, "threshold": thr,
                         "load_before": load, "load_after": os.getloadavg()[0], **point})
            print_row(name, rows[-1])
        results[name] = {"grid": list(dims), "heads": heads, "head_dim": HEAD_DIM, "batch": 1,
                         "tokens": grid.num_tokens, "blocks": layout.num_blocks, "points": rows}
    return results


def print_row(shape: str, r: dict[str, Any]) -> None:
    t = {name: v["median_s"] * 1e3 for name, v in r["times"].items()}
    dense = t["dense"]
    cells = "  ".join(f"{name} {ms:7.0f} ms ({dense / ms:4.2f}x)" for name, ms in t.items() if name != "dense")
    print(f"{shape:7s} {r['density']:5.1%} kept  dense {dense:7.0f} ms  {cells}  load {r['load_before']:.1f}", flush=True)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The bundled model's sampling at the demo's size: dense, and NABLA per backend, interleaved."""
    from nabla_attn.demo.cli import DEFAULT_STEPS, SIZES
    from nabla_attn.demo.model import CLASS_NAMES, load_bundled, sample
    from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla

    frames, height, width = SIZES["small"]
    steps = 2 if args.smoke else DEFAULT_STEPS["small"]
    model = load_bundled()
    model.set_attention(None)
    noise = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([CLASS_NAMES.index("bikes")])

    def nabla(backend: str) -> Callable[[], Any]:
        config = dataclasses.replace(NablaConfig.from_calibration(args.calibration, query_block=64), backend=backend)

        def call() -> Any:
            handle = apply_nabla(model.transformer, config)
            try:
                return sample(model, noise, labels, steps)
            finally:
                remove_nabla(handle)

        return call

    variants = {"dense": lambda: sample(model, noise, labels, steps), **{b: nabla(b) for b in BACKENDS}}
    load = os.getloadavg()[0]
    timing = interleaved(variants, 1 if args.smoke else args.demo_rounds)
    out = {"size": "small", "grid": [frames, height // 2, width // 2], "steps": steps, "calibration": args.calibration,
           "times": timing, "load_before": load, "load_after": os.getloadavg()[0]}
    dense = timing["dense"]["median_s"]
    print(f"demo sampling ({steps} steps): dense {dense:.1f} s  " + "  ".join(
        f"nabla/{b} {timing[b]['median_s']:.1f} s ({dense / timing[b]['median_s']:.2f}x)" for b in BACKENDS))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {}
    if args.out and Path(args.out).is_file():
        result = json.loads(Path(args.out).read_text())
    result["machine"] = machine()
    if args.demo:
        result["demo"] = run_demo(args)
    else:
        result["op"] = run_op(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
