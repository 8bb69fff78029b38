"""Cost of moving q, k, v into NABLA's tiled order and back on the GPU, on the layout diffusers'
processors hand over (``[B, S, H, D]`` memory viewed as ``[B, H, S, D]``) and on contiguous input.

Columns: the public ``nabla_attn.tile`` (the row-permutation kernel), the same tiling writing the
block means on the way (what ``nabla_attention`` runs for q and k), the eager definition
(``nabla_attn.grid.tile``, an index gather), the pre-kernel pad-then-gather, and ``untile`` into a
contiguous result and into the input's own memory layout (``like=``). Every variant's output is
checked against the eager definition first.

    PYTHONPATH=src python benchmarks/bench_tiling.py --out tiling.json
    PYTHONPATH=src python benchmarks/bench_tiling.py --smoke          # CPU, Triton interpreter
"""

from __future__ import annotations

import cpu_smoke  # first: a smoke run switches Triton's interpreter on before anything loads Triton

SMOKE = cpu_smoke.setup()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import harness as H  # noqa: E402
from nabla_attn import TokenLayout, VideoGrid, backends, grid as eager, tile, untile  # noqa: E402


def pad_then_gather(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The tiling before the kernel: a zero row appended, then one gather (padding slots read it)."""
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1))
    return padded.index_select(-2, layout.gather_index(x.device))


def measure(name: str, lay: TokenLayout, heads: int, head_dim: int, dtype: torch.dtype,
            device: torch.device) -> list[dict[str, Any]]:
    """Every column on one grid, for the processor's ``[B, S, H, D]`` view and for contiguous input."""
    tri = backends.get("triton")
    bshd = torch.randn(1, lay.seq_len, heads, head_dim, device=device, dtype=dtype)
    rows = []
    for layout_name, x in (("BSHD view", bshd.transpose(1, 2)), ("contiguous BHSD", bshd.transpose(1, 2).contiguous())):
        ref = eager.tile(x, lay)
        y, means = tri.tile(x, lay, pool=True)
        for what, got in (("tile", tile(x, lay)), ("tile with means", y), ("pad+gather", pad_then_gather(x, lay))):
            assert torch.equal(got, ref), f"{name} {layout_name}: {what} differs from nabla_attn.grid.tile"
        assert means is None or means.shape[2] == lay.num_video_blocks
        assert torch.equal(untile(ref, lay, like=x), x) and torch.equal(untile(ref, lay), x)
        gb = 2 * x.numel() * x.element_size() / 1e9  # read + write
        row = {"shape": name, "input": layout_name,
               "tile_ms": H.time_ms(lambda: tile(x, lay)),  # noqa: B023
               "tile_with_means_ms": H.time_ms(lambda: tri.tile(x, lay, pool=True)) if means is not None else None,  # noqa: B023
               "eager_gather_ms": H.time_ms(lambda: eager.tile(x, lay)),  # noqa: B023
               "pad_gather_ms": H.time_ms(lambda: pad_then_gather(x, lay)),  # noqa: B023
               "untile_ms": H.time_ms(lambda: untile(ref, lay)),  # noqa: B023
               "untile_like_input_ms": H.time_ms(lambda: untile(ref, lay, like=x))}  # noqa: B023
        row["tile_gbps"] = gb / row["tile_ms"] * 1e3
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/tiling.json; smoke runs: the temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(tempfile.gettempdir() if args.smoke else os.environ.get("OUT", "."), "tiling.json")
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_tiling needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, head_dim = (torch.bfloat16, 128) if device.type == "cuda" else (torch.float32, 16)
    shapes = [("wan14b_720p", VideoGrid(21, 45, 80), 40), ("wan1.3b_480p", VideoGrid(21, 30, 52), 12)]
    if args.smoke:
        shapes = [("smoke", VideoGrid(2, 9, 10), 2)]
    rows = [row for name, grid, heads in shapes for row in measure(name, TokenLayout(grid), heads, head_dim, dtype, device)]
    out = {**H.environment(device), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(out["card"])
    cols = ("tile_ms", "tile_with_means_ms", "eager_gather_ms", "pad_gather_ms", "untile_ms", "untile_like_input_ms", "tile_gbps")
    print(f"{'shape':<14}{'input':<18}" + "".join(f"{c:>22}" for c in cols))
    for r in rows:
        print(f"{r['shape']:<14}{r['input']:<18}" + "".join(f"{r[c]:>22.2f}" if r[c] is not None else f"{'-':>22}" for c in cols))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
