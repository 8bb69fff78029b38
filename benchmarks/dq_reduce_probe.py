"""Probe: what accumulating dQ across key blocks would cost a one-kernel backward (H200 diagnostic).

The backward runs two kernels (dQ over kv lists, dK/dV over q-side lists), so ``Q.K^T`` and
``dO.V^T`` are computed twice: 7 products per kept block pair where a one-kernel backward (the
FlashAttention-2/3 structure) needs 5, but sums each key block's dQ contribution into a float32
buffer from many programs. This times that sum alone, with the real access pattern: Wan 14B 720p
(21x40x80, 40 heads, structured q/k), the 64-row table at 10 % kept; one program per key block
and head walks the block's q-side list (as the dK/dV kernel does) and adds a 64 x 128 float32 tile
per entry into ``dq_accum`` ``[B*H*S, 128]``:

- ``atomic``: ``tl.atomic_add`` of the tile (relaxed, per-element reductions);
- ``tma_reduce``: the tile through a tensor descriptor's ``atomic_add`` (the copy engine's bulk
  reduce, ``cp.reduce.async.bulk.tensor``, what FlashAttention-3 uses for dQ);
- ``store``: a plain store of the tile (no reduction: the write traffic alone).

Each sum is checked (every tile adds 1.0: ``dq_accum`` must equal the q-side list counts per
tile). A one-kernel backward pays off only if this sum costs less than the two products it saves
(2 of the 7 the two kernels compute: ``benchmarks/bwd_lab.py`` times them in the same call).

    PYTHONPATH=src python benchmarks/dq_reduce_probe.py --out dq_reduce_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
from nabla_attn import TokenLayout, VideoGrid, tile  # noqa: E402


@triton.jit
def _reduce_probe(DQ, desc, QCNT, QIDX, c_h, i_h, i_r, S, MODE: tl.constexpr, D: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    cnt = tl.load(QCNT + bh * c_h + kb)
    row0 = bh * S
    rows = tl.arange(0, 64)
    cols = tl.arange(0, D)
    val = tl.full([64, D], 1.0, tl.float32)
    for j in range(cnt):
        qt = tl.load(QIDX + bh * i_h + kb * i_r + j)
        first = row0 + qt * 64
        ptrs = DQ + (first + rows).to(tl.int64)[:, None] * D + cols[None, :]
        if MODE == 0:
            tl.atomic_add(ptrs, val, sem="relaxed")
        elif MODE == 1:
            desc.atomic_add([first, 0], val)
        else:
            tl.store(ptrs, val)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dq_reduce_probe.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("dq_reduce_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.tools.tensor_descriptor import TensorDescriptor

    from nabla_attn.kernels.mask_build import compact

    lay = TokenLayout(VideoGrid(21, 40, 80))
    heads, D, dev = 40, 128, torch.device("cuda")
    qn, kn, _ = H.structured_qkv(lay, heads, D, torch.bfloat16, dev)
    q, k = tile(qn, lay), tile(kn, lay)
    _, mask = H.threshold_for_density(q, k, lay, 0.1, 64)
    qc, qi = compact(mask.kept, transpose=True)
    S = lay.tiled_len
    kept = int(mask.kept.sum())
    accum = torch.zeros(heads * S, D, dtype=torch.float32, device=dev)
    desc = TensorDescriptor.from_tensor(accum, [64, D])
    want = mask.kept[0].sum(-1).float().repeat_interleave(64, 1).reshape(-1, 1)  # [H*S, 1] keeps per q tile

    def run(mode: int) -> None:
        _reduce_probe[(lay.num_blocks, heads)](accum, desc, qc, qi, qc.stride(1), qi.stride(1), qi.stride(2), S,
                                               MODE=mode, D=D, num_warps=4)

    gb = kept * 64 * D * 4 / 1e9
    result: dict[str, Any] = {**H.environment(dev), "shape": "wan14b_720p", "density": mask.density,
                              "kept_pairs": kept, "tile_gb": gb, "modes": {}}
    print(f"{torch.cuda.get_device_name()}: {kept} kept block pairs (density {mask.density:.4f}), "
          f"{gb:.1f} GB of float32 dQ tiles", flush=True)
    for mode, name in ((0, "atomic"), (1, "tma_reduce"), (2, "store")):
        accum.zero_()
        run(mode)
        torch.cuda.synchronize()
        ok = bool(torch.equal(accum, want.expand_as(accum))) if mode < 2 else True
        ms = H.time_ms(lambda: run(mode), budget_ms=600)  # noqa: B023
        result["modes"][name] = {"ms": ms, "tb_per_s": gb / ms, "sums_correct": ok}
        print(f"  {name:11s} {ms:8.2f} ms  {gb / ms:6.2f} TB/s  sums {'ok' if ok else 'WRONG'}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if all(m["sums_correct"] for m in result["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
