"""Cost of tiling q, k, v into NABLA's block layout on the GPU: the library's ``tile`` against the
earlier pad-then-gather version, on the layout diffusers' processors hand over ([B, S, H, D] viewed
as [B, H, S, D]) and on contiguous input. Run: ``PYTHONPATH=src python benchmarks/bench_tiling.py``."""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

from nabla_attn import TokenLayout, VideoGrid, tile, untile
from nabla_attn.grid import _on_device


def pad_then_gather(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1))
    return padded.index_select(-2, _on_device("gather", layout, x.device))


def main() -> None:
    rows = []
    for name, grid, heads in (("wan14b_720p", VideoGrid(21, 45, 80), 40), ("wan1.3b_480p", VideoGrid(21, 30, 52), 12)):
        lay = TokenLayout(grid)
        bsdh = torch.randn(1, lay.seq_len, heads, 128, device="cuda", dtype=torch.bfloat16)
        for layout_name, x in (("BSHD view", bsdh.transpose(1, 2)), ("contiguous BHSD", bsdh.transpose(1, 2).contiguous())):
            assert torch.equal(tile(x, lay), pad_then_gather(x, lay))
            gb = 2 * x.numel() * x.element_size() / 1e9
            t_new = do_bench(lambda: tile(x, lay), return_mode="median")
            t_old = do_bench(lambda: pad_then_gather(x, lay), return_mode="median")
            y = tile(x, lay)
            t_un = do_bench(lambda: untile(y, lay), return_mode="median")
            rows.append(dict(shape=name, input=layout_name, tile_ms=t_new, pad_gather_ms=t_old, untile_ms=t_un,
                             tile_gbps=gb / t_new * 1e3))
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    path = os.path.join(os.environ.get("OUT", "."), "tiling.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(out["card"])
    print(f"{'shape':<14}{'input':<18}{'tile ms':>9}{'pad+gather ms':>15}{'untile ms':>11}{'tile GB/s':>11}")
    for r in rows:
        print(f"{r['shape']:<14}{r['input']:<18}{r['tile_ms']:>9.2f}{r['pad_gather_ms']:>15.2f}{r['untile_ms']:>11.2f}{r['tile_gbps']:>11.0f}")


if __name__ == "__main__":
    sys.exit(main())
