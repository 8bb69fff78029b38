"""Fused NABLA block-table builder: softmax + CDF cut + STA + text + query grouping + kv lists.

The eager definition (:func:`nabla_attn.masks.cdf_keep`) sorts every probability row, takes a running
sum, maps ties with ``searchsorted`` and scatters back through the sort order: at Wan 14B 720p that is
a sort, a gather and a scatter of ``[40, 1050, 1050]`` tensors with int64 indices (~14 ms, >1 GiB of
temporaries). Here one Triton program owns one query row of the table (two 64-token rows for
``query_block=128``), keeps the row of scores in registers, and finds the cut by bisection on the
*bit pattern* of the probability:

    S(x) = sum of P_i over i with P_i <= x      (non-decreasing in x, steps at the P_i)
    keep j  <=>  S(P_j) >= 1 - threshold  <=>  P_j >= x*,  x* = min{x : S(x) >= 1 - threshold}

Non-negative float32 values order like their int32 bit patterns, so 31 halvings of the int range
``[0, bits(1.0)]`` land exactly on ``x*`` (a value of the row), and ties are kept or dropped together
just as in the eager rule. The only difference from the eager result is the order of the float32
additions inside ``S``: blocks whose running sum lies within rounding of the cut may flip.

The same program ORs in the STA window (from block coordinates), keeps text rows and columns,
ORs consecutive 64-rows for ``query_block=128``, writes the bool row and compacts it into the kv
list (``tl.cumsum`` positions, no sort). Pooling and the ``[Nv, Nv]`` score product stay in PyTorch
(one fp32 ``[B, H, Nv, Nv]`` tensor, 176 MB at Wan 14B 720p).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..grid import BLOCK_TOKENS, TokenLayout, block_counts_on
from ..masks import BlockSparseMask, check_sta_window, check_threshold



@triton.jit
def _nabla_rows_kernel(
    S_ptr, KEPT_ptr, CNT_ptr, IDX_ptr,
    s_b, s_h, s_r,
    k_b, k_h, k_r,
    c_b, c_h,
    i_b, i_h, i_r,
    H, NV, NB, NQ,
    cut,
    WT, WR, WC, TR, TC,
    HAS_THR: tl.constexpr, HAS_STA: tl.constexpr, GROUP: tl.constexpr,
    WRITE_LISTS: tl.constexpr, BLOCK: tl.constexpr,
):
    qrow = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, BLOCK)
    in_table = cols < NB
    video_col = cols < NV
    keep_any = tl.zeros([BLOCK], dtype=tl.int32)
    for g in tl.static_range(GROUP):
        r = qrow * GROUP + g
        row_ok = r < NB
        is_text_row = r >= NV
        # Text columns are always kept; text rows keep everything.
        keep = (in_table & ((cols >= NV) | is_text_row)).to(tl.int32)
        if HAS_THR:
            s = tl.load(S_ptr + b * s_b + h * s_h + r * s_r + cols,
                        mask=video_col & row_ok & (r < NV), other=float("-inf"))
            m = tl.max(s, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)  # text rows load nothing: no -inf - -inf
            e = tl.exp(s - m)
            e = tl.where(video_col, e, 0.0)
            denom = tl.sum(e, axis=0)
            # Text rows load nothing (denom 0): divide by 1 there; video rows keep 0/0 = NaN semantics.
            p = e / tl.where((denom > 0) | (r < NV), denom, 1.0)
            p = tl.where(video_col, p, 0.0)
            # A row with NaN/inf anywhere keeps every block (NaN must reach the output).
            bad = tl.sum(((p != p) | (p == float("inf"))).to(tl.int32), axis=0) > 0
            pb = p.to(tl.int32, bitcast=True)
            total = tl.sum(p, axis=0)
            # int32 scalars (not constexpr) so the loop can carry them.
            lo = qrow * 0 - 1
            hi = qrow * 0 + 0x3F800000
            # Invariant: S(lo) < cut <= S(hi) (S(bits(1.0)) = total; checked below).
            for _ in range(31):
                mid = (lo + hi) // 2
                smid = tl.sum(tl.where(pb <= mid, p, 0.0), axis=0)
                go_lo = smid >= cut
                hi = tl.where(go_lo, mid, hi)
                lo = tl.where(go_lo, lo, mid)
            # (tl.where on the reduced scalars: the interpreter cannot AND a vector with them.)
            cut_keep = tl.where(total >= cut, (pb >= hi) & video_col, False)
            cut_keep = tl.where(bad, video_col, cut_keep)
            keep = keep | (cut_keep & (r < NV)).to(tl.int32)
        if HAS_STA:
            rt = r // (TR * TC)
            rr = (r // TC) % TR
            rc = r % TC
            ct = cols // (TR * TC)
            cr = (cols // TC) % TR
            cc = cols % TC
            near = (tl.abs(ct - rt) <= WT) & (tl.abs(cr - rr) <= WR) & (tl.abs(cc - rc) <= WC)
            keep = keep | (near & video_col & (r < NV)).to(tl.int32)
        keep_any = keep_any | tl.where(row_ok, keep, 0)
    keep_any = tl.where(in_table, keep_any, 0)
    tl.store(KEPT_ptr + b * k_b + h * k_h + qrow * k_r + cols, keep_any.to(tl.int8), mask=in_table)
    if WRITE_LISTS:
        pos = tl.cumsum(keep_any, axis=0) - 1
        tl.store(IDX_ptr + b * i_b + h * i_h + qrow * i_r + pos, cols, mask=keep_any != 0)
        tl.store(CNT_ptr + b * c_b + h * c_h + qrow, tl.sum(keep_any, axis=0))


@triton.jit
def _pool_kernel(X, Y, OUT_X, OUT_Y, BCNT, s_b, s_h, s_s, H, NV, HEAD_DIM: tl.constexpr, TWO: tl.constexpr):
    """Mean of each block's real tokens: one program per (block, batch*head), fp32 accumulation.

    Padding slots hold zeros (``tile`` writes them), so the sum runs over all 64 rows and only
    the divisor uses the real count. q (and k, with ``TWO``: both loads in flight in one program)
    is read once, in its own dtype (no float32 copy).
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * 64 + tl.arange(0, 64)
    d = tl.arange(0, HEAD_DIM)
    off = b * s_b + h * s_h + rows[:, None] * s_s + d[None, :]
    cnt = tl.load(BCNT + blk).to(tl.float32)
    x = tl.load(X + off).to(tl.float32)
    if TWO:
        y = tl.load(Y + off).to(tl.float32)
        tl.store(OUT_Y + (bh * NV + blk) * HEAD_DIM + d, tl.sum(y, 0) / cnt)
    tl.store(OUT_X + (bh * NV + blk) * HEAD_DIM + d, tl.sum(x, 0) / cnt)


@triton.jit
def _compact_kernel(
    T_ptr, CNT_ptr, IDX_ptr,
    t_b, t_h, t_r, t_c,
    c_b, c_h,
    i_b, i_h, i_r,
    H, NR, NC, NC_OUT,
    RGROUP: tl.constexpr, CGROUP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row compaction of a bool table (any strides): ``out[r, c] = OR of T[r*RG + i, c*CG + j]``."""
    row = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, BLOCK)
    ok = cols < NC_OUT
    keep = tl.zeros([BLOCK], dtype=tl.int32)
    base = T_ptr + b * t_b + h * t_h
    for i in tl.static_range(RGROUP):
        for j in tl.static_range(CGROUP):
            rr = row * RGROUP + i
            cc = cols * CGROUP + j
            v = tl.load(base + rr * t_r + cc * t_c, mask=ok & (rr < NR) & (cc < NC), other=0)
            keep = keep | (v != 0).to(tl.int32)
    keep = tl.where(ok, keep, 0)
    pos = tl.cumsum(keep, axis=0) - 1
    tl.store(IDX_ptr + b * i_b + h * i_h + row * i_r + pos, cols, mask=keep != 0)
    tl.store(CNT_ptr + b * c_b + h * c_h + row, tl.sum(keep, axis=0))


def compact_table(kept: torch.Tensor, row_group: int = 1, col_group: int = 1, *, transpose: bool = False,
                  n_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts int32 ``[B, H, R]`` and ascending index lists int32 ``[B, H, R, C]`` of a bool table.

    ``transpose=True`` compacts columns instead (the q-side lists the backward pass needs).
    ``row_group``/``col_group`` OR that many consecutive rows/columns first (64-row table ->
    128-row tiles). Broadcast (size-1) batch/head dimensions stay size 1. ``n_cols`` overrides the
    output column count (used when an odd row count is grouped).
    """
    if kept.dtype != torch.bool or kept.dim() != 4:
        raise ValueError(f"compact_table needs a 4-D bool table, got {kept.dtype} {tuple(kept.shape)}")
    t = kept.view(torch.uint8)
    B, H = t.shape[:2]
    sb, sh, sr, sc = t.stride()
    nr, nc = t.shape[2], t.shape[3]
    if transpose:
        sr, sc = sc, sr
        nr, nc = nc, nr
    r_out = -(-nr // row_group)
    c_out = n_cols if n_cols is not None else -(-nc // col_group)
    counts = torch.empty(B, H, r_out, dtype=torch.int32, device=kept.device)
    idx = torch.empty(B, H, r_out, c_out, dtype=torch.int32, device=kept.device)
    block = triton.next_power_of_2(c_out)
    _compact_kernel[(r_out, B * H)](
        t, counts, idx, sb, sh, sr, sc,
        counts.stride(0), counts.stride(1), idx.stride(0), idx.stride(1), idx.stride(2),
        H, nr, nc, c_out, RGROUP=row_group, CGROUP=col_group, BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return counts, idx


def pool_blocks_lean(x: torch.Tensor, layout: TokenLayout, n: int) -> torch.Tensor:
    """Mean of the real tokens of the first ``n`` blocks, float32 ``[B, H, n, D]``.

    Accumulates in float32 without a float32 copy of ``x`` (the eager ``x.float()`` would add
    1.4 GB at Wan 14B 720p). A Triton kernel for power-of-two head dims, else a torch reduction.
    """
    B, H, _, D = x.shape
    if _poolable(x):
        out = torch.empty(B, H, n, D, dtype=torch.float32, device=x.device)
        _pool_kernel[(n, B * H)](x, x, out, out, block_counts_on(layout, x.device), x.stride(0), x.stride(1),
                                 x.stride(2), H, n, HEAD_DIM=D, TWO=False, num_warps=4)
        return out
    sums = x[:, :, : n * BLOCK_TOKENS].reshape(B, H, n, BLOCK_TOKENS, D).sum(-2, dtype=torch.float32)
    counts = block_counts_on(layout, x.device)[:n].to(torch.float32)
    return sums / counts.view(1, 1, -1, 1)


def pool_blocks_pair(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pool_blocks_lean` of q and k in one pass (both loads in flight per program)."""
    if not (_poolable(q) and k.shape == q.shape and k.stride() == q.stride()):
        return pool_blocks_lean(q, layout, n), pool_blocks_lean(k, layout, n)
    B, H, _, D = q.shape
    qa = torch.empty(B, H, n, D, dtype=torch.float32, device=q.device)
    ka = torch.empty_like(qa)
    _pool_kernel[(n, B * H)](q, k, qa, ka, block_counts_on(layout, q.device), q.stride(0), q.stride(1), q.stride(2),
                             H, n, HEAD_DIM=D, TWO=True, num_warps=4)
    return qa, ka


def _poolable(x: torch.Tensor) -> bool:
    return x.shape[-1] in (16, 32, 64, 128, 256) and x.stride(-1) == 1


def build_nabla_mask_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    *,
    query_block: int = 64,
    write_lists: bool = True,
) -> BlockSparseMask:
    """:func:`nabla_attn.nabla_mask_tiled` through the fused Triton row kernel.

    Same arguments and result as the eager builder (up to float rounding at the cut). With
    ``write_lists`` the kv lists (``mask.kv_lists()``) are written by the same kernel and cached on
    the mask, so no separate compaction pass runs.
    """
    check_threshold(threshold)
    win = check_sta_window(sta_window)
    if query_block not in (64, 128):
        raise ValueError(f"query_block must be 64 or 128, got {query_block!r}")
    if threshold is None and win is None:
        raise ValueError("nabla_mask needs a threshold, an sta_window, or both")
    if q.shape[-2] != layout.tiled_len or k.shape != q.shape:
        raise ValueError(f"q, k must be tiled [B, H, {layout.tiled_len}, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    nv = layout.num_video_blocks
    dev = q.device
    with torch.no_grad():
        if threshold is not None:
            qa, ka = pool_blocks_pair(q, k, layout, nv)
            scores = (qa @ ka.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            del qa, ka
            cut: float | None = float(torch.tensor(1.0 - float(threshold), dtype=torch.float32))
        else:
            scores = torch.empty(1, 1, 1, 1, device=dev, dtype=torch.float32)
            cut = None
        kept, lists = table_from_scores(scores, layout, cut, win, query_block, write_lists=write_lists)
        del scores
    mask = BlockSparseMask(kept, layout, query_block)
    if lists is not None:
        mask._cache["kv"] = lists
    return mask


def table_from_scores(
    scores: torch.Tensor,
    layout: TokenLayout,
    cut: float | None,
    sta_window: tuple[int, int, int] | None,
    query_block: int,
    *,
    write_lists: bool = False,
    row_warps: int = 2,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The fused row kernel on precomputed block scores (``[B, H, Nv, Nv]`` float32, pre-softmax).

    ``cut = 1 - threshold`` as float32 (None: STA only, ``scores`` ignored). Returns the bool table
    ``[B, H, Qb, Kb]`` (text rows/columns kept, STA ORed in, rows grouped for ``query_block``) and,
    with ``write_lists``, its kv lists ``(counts, indices)``. Public entry point for callers that
    compute scores themselves (e.g. from gathered block means in the distributed path).
    """
    nv, nb = layout.num_video_blocks, layout.num_blocks
    group = query_block // BLOCK_TOKENS
    nq = -(-nb // group)
    dev = scores.device
    if cut is None:
        B, H = 1, 1
        cut_value = 1.0
    else:
        scores = scores.contiguous()
        B, H = scores.shape[:2]
        cut_value = float(cut)
    kept = torch.empty(B, H, nq, nb, dtype=torch.bool, device=dev)
    if write_lists:
        counts = torch.empty(B, H, nq, dtype=torch.int32, device=dev)
        idx = torch.empty(B, H, nq, nb, dtype=torch.int32, device=dev)
    else:
        counts = idx = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=dev)
    wt, wr, wc = ((w // 2 for w in sta_window) if sta_window is not None else (0, 0, 0))
    _, tr, tc = layout.grid.block_grid
    block = triton.next_power_of_2(nb)
    _nabla_rows_kernel[(nq, B * H)](
        scores, kept.view(torch.uint8), counts, idx,
        scores.stride(0), scores.stride(1), scores.stride(2),
        kept.stride(0), kept.stride(1), kept.stride(2),
        counts.stride(0), counts.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        H, nv, nb, nq, cut_value, wt, wr, wc, tr, tc,
        HAS_THR=cut is not None, HAS_STA=sta_window is not None, GROUP=group,
        # One or two warps per row: the 31 bisection sums are latency-bound cross-warp reductions,
        # so fewer warps per row and more rows per SM win (H200, Wan 14B 720p: 0.80 ms with 2
        # warps vs 1.23 ms with 8). Slower still, measured: 4-16 pivots per step in one 2-D sum
        # (1.25-2.3 ms), and stopping once (lo, hi] holds one value (a sum + count reduction per
        # step in a while loop: 1.01 ms).
        WRITE_LISTS=write_lists, BLOCK=block, num_warps=row_warps,
    )
    return kept, ((counts, idx) if write_lists else None)


def fast_mask_available(q: torch.Tensor) -> bool:
    """True where :func:`build_nabla_mask_fast` runs: CUDA tensors (or anything under the interpreter)."""
    from triton import knobs

    return bool(q.is_cuda or knobs.runtime.interpret)
