"""Row permutation between natural and tiled token order on the GPU (``tile`` / ``untile``).

``torch.index_select`` along the token axis of a strided ``[B, H, S, D]`` view (diffusers hands q,
k, v over as ``[B, S, H, D]`` memory) ran at ~1.1 TB/s on an H200. Here one program copies 64 rows
of one (batch, head): each row is ``D`` contiguous elements, so reads and writes are whole cache
lines whatever the strides of the token and head axes, and the output can be written straight
into any layout (``untile`` writes into the caller's layout, so no transpose copy follows).

Tiling q and k can also write NABLA's block means on the way (``means``): a program's 64 output rows
are one block, so the mask builder need not read the tiled q and k again (one 1.4 GB pass less at
Wan 14B 720p). The sum runs over the same ``[64, D]`` tile shape and warps as the builder's own
pooling kernel, so the means, and the mask, are the same bits either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_build import POOL_WARPS


@triton.jit
def _gather_rows_kernel(
    X, Y, IDX, MEANS, BCNT,
    sx_b, sx_h, sx_s, sy_b, sy_h, sy_s,
    H, N_OUT, D, NV,
    BLOCK_D: tl.constexpr, ROWS: tl.constexpr, POOL: tl.constexpr,
):
    """``Y[b, h, r] = X[b, h, IDX[r]]`` (zeros where ``IDX[r] < 0``). ``POOL`` (``ROWS`` = 64, ``D``
    a power of two): also ``MEANS[b*H + h, blk] = sum of the block's rows / BCNT[blk]`` for the
    first ``NV`` blocks."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    r = pid * ROWS + tl.arange(0, ROWS)
    ok = r < N_OUT
    src = tl.load(IDX + r, mask=ok, other=-1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    if POOL:
        # No column mask (D == BLOCK_D): the same load, layout and reduction as _pool_kernel.
        x = tl.load(X + b * sx_b + h * sx_h + src[:, None] * sx_s + d[None, :], mask=(src >= 0)[:, None], other=0.0)
        tl.store(Y + b * sy_b + h * sy_h + r.to(tl.int64)[:, None] * sy_s + d[None, :], x, mask=ok[:, None])
        if pid < NV:
            cnt = tl.load(BCNT + pid).to(tl.float32)
            tl.store(MEANS + (bh * NV + pid) * BLOCK_D + d, tl.sum(x.to(tl.float32), 0) / cnt)
    else:
        dok = d < D
        x = tl.load(X + b * sx_b + h * sx_h + src[:, None] * sx_s + d[None, :],
                    mask=(src >= 0)[:, None] & dok[None, :], other=0.0)
        tl.store(Y + b * sy_b + h * sy_h + r.to(tl.int64)[:, None] * sy_s + d[None, :], x,
                 mask=ok[:, None] & dok[None, :])


def gather_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, means: torch.Tensor | None = None,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, h, r] = x[b, h, index[r]]`` for 4-D ``[B, H, *, D]`` tensors with unit stride in D.

    ``index`` is int32 ``[out.shape[2]]``; entries < 0 give zero rows. Any other strides.
    ``means``: contiguous float32 ``[B, H, NV, D]`` (``D`` a power of two), filled with the mean of
    each of the first ``NV`` 64-row output blocks over its ``counts[blk]`` real rows (int32).
    """
    B, H, n_out, D = out.shape
    if x.shape[:2] != out.shape[:2] or x.shape[3] != D or x.stride(3) != 1 or out.stride(3) != 1:
        raise ValueError(f"gather_rows: x {tuple(x.shape)} (strides {x.stride()}) does not fit out {tuple(out.shape)}")
    if index.shape != (n_out,) or index.dtype != torch.int32:
        raise ValueError(f"gather_rows: index must be int32 [{n_out}], got {index.dtype} {tuple(index.shape)}")
    rows = 64
    pool = means is not None
    if pool:
        if (means.dtype != torch.float32 or not means.is_contiguous() or means.shape[:2] != out.shape[:2]
                or means.shape[3] != D or D != triton.next_power_of_2(D) or counts is None
                or means.shape[2] > counts.numel()):
            raise ValueError(f"gather_rows: means {means.dtype} {tuple(means.shape)} does not fit out {tuple(out.shape)}")
    _gather_rows_kernel[(-(-n_out // rows), B * H)](
        x, out, index, means if pool else out, counts if pool else index,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, n_out, D, means.shape[2] if pool else 0, BLOCK_D=triton.next_power_of_2(D), ROWS=rows, POOL=pool,
        # Pooling runs on the mask builder's pooling warps, so the sums are the same bits.
        num_warps=POOL_WARPS if pool else 4,
    )
    return out
