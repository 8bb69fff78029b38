"""``nabla example``: run NABLA attention once on this device and compare it with dense attention.

Inputs have the structure real video attention has (smooth in space and time, so nearby blocks
matter more), which random i.i.d. tensors lack: on those every block map is near uniform.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .attention import nabla_attention, select_backend
from .grid import VideoGrid
from .masks import MaskSpec


def _smooth_video_tensor(batch: int, heads: int, grid: VideoGrid, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency random field over (t, h, w) plus noise: neighbouring tokens look alike."""
    T, H, W = grid.frames, grid.height, grid.width
    coarse = torch.randn(batch * heads, dim, max(2, T // 2), max(2, H // 6), max(2, W // 6), generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(T, H, W), mode="trilinear", align_corners=False)
    field = field.view(batch, heads, dim, T * H * W).transpose(-1, -2)
    return 3.0 * field + 0.5 * torch.randn(batch, heads, T * H * W, dim, generator=gen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", default="5x30x52", help="latent grid FRAMESxHEIGHTxWIDTH (default 5x30x52)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--sta-window", default=None, help="STA window wTxwHxwW in blocks, e.g. 3x3x3")
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "flex", "triton"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def _parse_triple(text: str, what: str) -> tuple[int, int, int]:
    try:
        a, b, c = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{what} must look like 5x30x52, got {text!r}") from None
    return a, b, c


def run(args: argparse.Namespace) -> int:
    # Bad arguments get one line on stderr and exit status 2, like argparse's own errors.
    try:
        return _run(args)
    except (ValueError, TypeError) as exc:
        print(f"nabla example: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    grid = VideoGrid(*_parse_triple(args.grid, "--grid"))
    window = _parse_triple(args.sta_window, "--sta-window") if args.sta_window else None
    MaskSpec(args.threshold, window)  # checks the threshold and window before any work
    if args.heads < 1 or args.head_dim < 1:
        raise ValueError(f"--heads and --head-dim must be >= 1, got {args.heads} and {args.head_dim}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: the example runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (_smooth_video_tensor(1, args.heads, grid, args.head_dim, gen).to(device, dtype) for _ in range(3))
    backend = select_backend(q, args.backend)
    print(f"grid {grid.frames}x{grid.height}x{grid.width} = {grid.num_tokens} tokens, {args.heads} heads x {args.head_dim}, "
          f"{dtype} on {device}, backend {backend!r}")

    def timed(fn):
        fn()  # warm-up (compilation on GPU backends)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    (sparse, mask), t_sparse = timed(lambda: nabla_attention(
        q, k, v, grid, args.threshold, window, backend=backend, return_mask=True))
    dense, t_dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    rel = float((sparse.double() - exact).norm() / exact.norm())
    rel_dense = float((dense.double() - exact).norm() / exact.norm())
    print(f"kept density      {mask.density:.3f}  (per head: {', '.join(f'{d:.2f}' for d in mask.head_density()[0].tolist())})")
    print(f"relative error    NABLA vs exact dense {rel:.2e}   (dense SDPA in {dtype}: {rel_dense:.2e})")
    print(f"time              NABLA {t_sparse * 1e3:.1f} ms (mask included)   dense SDPA {t_dense * 1e3:.1f} ms")
    return 0
