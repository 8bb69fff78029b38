"""Fused NABLA block-table builder: pooling, block scores, softmax + CDF cut + STA + text + query
grouping + kv lists, and row compaction of any bool table.

The eager definition (:func:`nabla_attn.masks.cdf_keep`) sorts every probability row, takes a running
sum, maps ties with ``searchsorted`` and scatters back through the sort order: at Wan 14B 720p that is
a sort, a gather and a scatter of ``[40, 1050, 1050]`` tensors with int64 indices (~14 ms, >1 GiB of
temporaries). Here each Triton program owns two 64-token rows of the table, keeps their scores
in registers (each row as a power-of-two segment plus its rest, so 1,050 columns take 1,056 lanes,
not 2,048), and finds each row's cut by bisection on the *bit pattern* of the probability:

    S(x) = sum of P_i over i with P_i <= x      (non-decreasing in x, steps at the P_i)
    keep j  <=>  S(P_j) >= 1 - threshold  <=>  P_j >= x*,  x* = min{x : S(x) >= 1 - threshold}

Non-negative float32 values order like their int32 bit patterns, so 31 halvings of the int range
``[0, bits(1.0)]`` land exactly on ``x*`` (a value of the row), and ties are kept or dropped together
just as in the eager rule. The only differences from the eager result are float32 rounding: the
order of the additions inside ``S``, and the score product (three TF32 products, ``tf32x3``,
against the eager float32 matmul). Blocks whose running sum lies within rounding of the cut may
flip (H200: 6 of 44.1 M table entries at Wan 14B 720p, 37 of 94.5 M at HunyuanVideo 720p).

The same program ORs in the STA window (from block coordinates), keeps text rows and columns,
ORs consecutive 64-rows for 128-token query rows, writes the bool row and compacts it into the kv
list (``tl.cumsum`` positions, no sort). Before it, one kernel pools q and k (one read of each, in
their dtype) and one computes the float32 ``[B, H, Nv, Nv]`` scores on tensor cores (``tf32x3``).

Launchers take raw tensors and plain numbers; the table's meaning lives in ``nabla_attn.masks``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..constants import BLOCK_TOKENS

# Warps of the pooling program (docs/kernel-notes.md v22). The tiling kernel pools with the same
# count, so its block means are the same bits (kernels/permute.py).
POOL_WARPS = 2


@triton.jit
def _sum_at_or_below(p, bits, mid):
    """Per row: the probability mass of the entries whose bit pattern is <= ``mid`` (``[R]``)."""
    return tl.sum(tl.where(bits <= mid[:, None], p, 0.0), axis=1)


@triton.jit
def _fixed_keep(r, cols, NV, NB, WT, WR, WC, TR, TC, HAS_STA: tl.constexpr):
    """What rows ``r`` keep at columns ``cols`` whatever the scores: text rows keep everything,
    every row keeps the text columns, and the STA window (``int32 [R, C]``)."""
    keep = (((cols < NB)[None, :]) & ((cols >= NV)[None, :] | (r >= NV)[:, None])).to(tl.int32)
    if HAS_STA:
        rt = r // (TR * TC)
        rr = (r // TC) % TR
        rc = r % TC
        ct = cols // (TR * TC)
        cr = (cols // TC) % TR
        cc = cols % TC
        near = ((tl.abs(ct[None, :] - rt[:, None]) <= WT) & (tl.abs(cr[None, :] - rr[:, None]) <= WR)
                & (tl.abs(cc[None, :] - rc[:, None]) <= WC))
        keep = keep | (near & (cols < NV)[None, :] & (r < NV)[:, None]).to(tl.int32)
    return keep


@triton.jit
def _scores(S_row, s_r, r, cols, NV):
    """Block scores of video rows ``r`` x video columns ``cols``; ``-inf`` elsewhere."""
    ok = (cols < NV)[None, :] & (r < NV)[:, None]
    return tl.load(S_row + r[:, None] * s_r + cols[None, :], mask=ok, other=float("-inf"))


@triton.jit
def _probs(s, m, denom, cols, NV):
    return tl.where((cols < NV)[None, :], tl.exp(s - m[:, None]) / denom[:, None], 0.0)


@triton.jit
def _n_bad(p):
    return tl.sum(((p != p) | (p == float("inf"))).to(tl.int32), axis=1)


@triton.jit
def _cut_keep(bits, hi, bad, r, cols, NV):
    """The CDF cut's keeps: entries at or above the cut value ``hi``; every video column of rows
    with a NaN/inf probability."""
    sel = (bits >= hi[:, None]) | bad[:, None]
    return (sel & (cols < NV)[None, :] & (r < NV)[:, None]).to(tl.int32)


@triton.jit
def _store_rows(KEPT_row, IDX_row, CNT_row, k_r, i_r, orow, ok, ka, kb, ca, cb, NB, WRITE_LISTS: tl.constexpr):
    """Rows ``orow`` (where ``ok``) of the bool table and, with ``WRITE_LISTS``, their kv lists, from
    the keeps of two column segments ``ca`` and ``cb``."""
    in_a = ok[:, None] & (ca < NB)[None, :]
    in_b = ok[:, None] & (cb < NB)[None, :]
    ka = tl.where(in_a, ka, 0)
    kb = tl.where(in_b, kb, 0)
    tl.store(KEPT_row + orow[:, None] * k_r + ca[None, :], ka.to(tl.int8), mask=in_a)
    tl.store(KEPT_row + orow[:, None] * k_r + cb[None, :], kb.to(tl.int8), mask=in_b)
    if WRITE_LISTS:
        na = tl.sum(ka, axis=1)
        base = IDX_row + orow[:, None] * i_r
        tl.store(base + tl.cumsum(ka, axis=1) - 1, ca[None, :] + orow[:, None] * 0, mask=ka != 0)
        tl.store(base + na[:, None] + tl.cumsum(kb, axis=1) - 1, cb[None, :] + orow[:, None] * 0, mask=kb != 0)
        tl.store(CNT_row + orow, na + tl.sum(kb, axis=1), mask=ok)


@triton.jit
def _nabla_rows_kernel(
    S_ptr, KEPT_ptr, CNT_ptr, IDX_ptr,
    s_b, s_h, s_r,
    k_b, k_h, k_r,
    c_b, c_h,
    i_b, i_h, i_r,
    H, NV, NB,
    cut,
    WT, WR, WC, TR, TC,
    HAS_THR: tl.constexpr, HAS_STA: tl.constexpr, GROUP: tl.constexpr,
    WRITE_LISTS: tl.constexpr, MAIN: tl.constexpr, TAIL: tl.constexpr,
):
    """Two 64-token rows of the table per program, each row's columns split into a ``MAIN`` and a
    ``TAIL`` segment (1,050 columns: 1,024 + 32 lanes rather than 2,048). ``GROUP == 2`` writes
    their OR as one 128-token query row."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    r = pid * 2 + tl.arange(0, 2)
    ca = tl.arange(0, MAIN)
    cb = MAIN + tl.arange(0, TAIL)
    keep_a = _fixed_keep(r, ca, NV, NB, WT, WR, WC, TR, TC, HAS_STA)
    keep_b = _fixed_keep(r, cb, NV, NB, WT, WR, WC, TR, TC, HAS_STA)
    if HAS_THR:
        S_row = S_ptr + b * s_b + h * s_h
        sa = _scores(S_row, s_r, r, ca, NV)
        sb = _scores(S_row, s_r, r, cb, NV)
        m = tl.maximum(tl.max(sa, axis=1), tl.max(sb, axis=1))
        m = tl.where(m == float("-inf"), 0.0, m)  # text rows load nothing: no -inf - -inf
        denom = (tl.sum(tl.where((ca < NV)[None, :], tl.exp(sa - m[:, None]), 0.0), axis=1)
                 + tl.sum(tl.where((cb < NV)[None, :], tl.exp(sb - m[:, None]), 0.0), axis=1))
        # Text rows load nothing (denom 0): divide by 1 there; video rows keep 0/0 = NaN semantics.
        denom = tl.where((denom > 0) | (r < NV), denom, 1.0)
        pa = _probs(sa, m, denom, ca, NV)
        pb = _probs(sb, m, denom, cb, NV)
        # A row with NaN/inf anywhere keeps every block (NaN must reach the output).
        bad = (_n_bad(pa) + _n_bad(pb)) > 0
        reached = (tl.sum(pa, axis=1) + tl.sum(pb, axis=1)) >= cut
        ba = pa.to(tl.int32, bitcast=True)
        bb = pb.to(tl.int32, bitcast=True)
        lo = tl.full([2], -1, tl.int32)
        hi = tl.full([2], 0x3F800000, tl.int32)
        # Invariant: S(lo) < cut <= S(hi) (S(bits(1.0)) = total; rows where it is not are `reached` False).
        for _ in range(31):
            mid = (lo + hi) // 2
            go_lo = (_sum_at_or_below(pa, ba, mid) + _sum_at_or_below(pb, bb, mid)) >= cut
            hi = tl.where(go_lo, mid, hi)
            lo = tl.where(go_lo, lo, mid)
        # With exact sums a row's largest probability always reaches the cut; where float32 rounding
        # leaves the row's total below it (a threshold near 0), keep the largest block (and its ties).
        top = tl.maximum(tl.max(ba, axis=1), tl.max(bb, axis=1))
        hi = tl.where(reached, hi, top)
        keep_a = keep_a | _cut_keep(ba, hi, bad, r, ca, NV)
        keep_b = keep_b | _cut_keep(bb, hi, bad, r, cb, NV)
    KEPT_row = KEPT_ptr + b * k_b + h * k_h
    IDX_row = IDX_ptr + b * i_b + h * i_h
    CNT_row = CNT_ptr + b * c_b + h * c_h
    row_ok = r < NB
    if GROUP == 2:
        orow = pid + tl.zeros([1], tl.int32)
        ka = tl.max(tl.where(row_ok[:, None], keep_a, 0), axis=0, keep_dims=True)
        kb = tl.max(tl.where(row_ok[:, None], keep_b, 0), axis=0, keep_dims=True)
        _store_rows(KEPT_row, IDX_row, CNT_row, k_r, i_r, orow, orow >= 0, ka, kb, ca, cb, NB, WRITE_LISTS)
    else:
        _store_rows(KEPT_row, IDX_row, CNT_row, k_r, i_r, r, row_ok, keep_a, keep_b, ca, cb, NB, WRITE_LISTS)


def row_segments(nb: int) -> tuple[int, int]:
    """Power-of-two lane counts ``(main, tail)`` covering ``nb`` columns with little waste."""
    main = 1 << (nb.bit_length() - 1)  # largest power of two <= nb
    rest = nb - main
    if rest == 0:
        return (main // 2, main // 2) if main > 1 else (1, 1)
    return main, triton.next_power_of_2(rest)


def nabla_table(
    scores: torch.Tensor | None,
    *,
    device: torch.device,
    num_video_blocks: int,
    num_blocks: int,
    tile_rows: int,
    tile_cols: int,
    cut: float | None,
    window: tuple[int, int, int] | None,
    group: int,
    write_lists: bool = True,
    row_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused row kernel: bool table ``[B, H, Qb, Kb]`` and its kv lists ``(counts [B,H,Qb],
    indices [B,H,Qb,Kb])`` (int32; size-1 placeholders unless ``write_lists``).

    ``scores``: float32 pre-softmax block scores ``[B, H, Nv, Nv]`` on ``device`` (None with ``cut``
    None: STA alone, batch and heads 1). ``cut`` = ``1 - threshold`` as float32 compares it. ``window``:
    STA half-widths ``(wT//2, wH//2, wW//2)`` in blocks. ``group``: 64-token rows per query row (1, 2).
    Text rows and columns (blocks ``>= num_video_blocks``) are kept.
    """
    nv, nb = num_video_blocks, num_blocks
    nq = -(-nb // group)
    dev = device
    if cut is None or scores is None:
        if cut is not None:
            raise ValueError("nabla_table: a cut needs scores")
        scores = torch.empty(1, 1, 1, 1, device=dev, dtype=torch.float32)
        B, H = 1, 1
    else:
        scores = scores.contiguous()
        B, H = scores.shape[:2]
    kept = torch.empty(B, H, nq, nb, dtype=torch.bool, device=dev)
    if write_lists:
        counts = torch.empty(B, H, nq, dtype=torch.int32, device=dev)
        idx = torch.empty(B, H, nq, nb, dtype=torch.int32, device=dev)
    else:  # placeholders the kernel never writes
        counts = torch.empty(1, 1, 1, dtype=torch.int32, device=dev)
        idx = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=dev)
    wt, wr, wc = window if window is not None else (0, 0, 0)
    main, tail = row_segments(nb)
    _nabla_rows_kernel[(-(-nb // 2), B * H)](
        scores, kept.view(torch.uint8), counts, idx,
        scores.stride(0), scores.stride(1), scores.stride(2),
        kept.stride(0), kept.stride(1), kept.stride(2),
        counts.stride(0), counts.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        H, nv, nb, 1.0 if cut is None else float(cut), wt, wr, wc, tile_rows, tile_cols,
        HAS_THR=cut is not None, HAS_STA=window is not None, GROUP=group,
        # The bisection is bound by instruction issue: ~NB lanes per row and two rows per program,
        # 1 warp for 128-token rows and 2 for 64 (docs/kernel-notes.md v13-v18).
        WRITE_LISTS=write_lists, MAIN=main, TAIL=tail, num_warps=row_warps or (1 if group == 2 else 2),
    )  # fmt: skip
    return kept, counts, idx


@triton.jit
def _pool_kernel(X, Y, OUT_X, OUT_Y, BCNT, s_b, s_h, s_s, H, NV, HEAD_DIM: tl.constexpr, TWO: tl.constexpr):
    """Mean of each block's real tokens: one program per (block, batch*head), fp32 accumulation.

    Padding slots hold zeros (tiling writes them), so the sum runs over all 64 rows and only the
    divisor uses the real count. q (and k, with ``TWO``: both loads in flight in one program) is read
    once, in its own dtype (no float32 copy).
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = (blk * 64 + tl.arange(0, 64)).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    off = b * s_b + h * s_h + rows[:, None] * s_s + d[None, :]
    cnt = tl.load(BCNT + blk).to(tl.float32)
    x = tl.load(X + off).to(tl.float32)
    if TWO:
        y = tl.load(Y + off).to(tl.float32)
        tl.store(OUT_Y + (bh * NV + blk) * HEAD_DIM + d, tl.sum(y, 0) / cnt)
    tl.store(OUT_X + (bh * NV + blk) * HEAD_DIM + d, tl.sum(x, 0) / cnt)


def poolable(x: torch.Tensor) -> bool:
    """Whether the pooling kernel serves ``x`` (a power-of-two head_dim up to 256, unit stride in D)."""
    return x.shape[-1] in (16, 32, 64, 128, 256) and x.stride(-1) == 1


def pool_pair(q: torch.Tensor, k: torch.Tensor, block_counts: torch.Tensor, n: int, *,
              warps: int = POOL_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 means ``[B, H, n, D]`` of the first ``n`` 64-row blocks of tiled q and k ``[B, H, S, D]``
    (same shape and strides, :func:`poolable`), divided by ``block_counts[:n]`` (int32), in one pass."""
    B, H, _, D = q.shape
    if not (poolable(q) and k.shape == q.shape and k.stride() == q.stride()):
        raise ValueError(f"pool_pair needs q, k of one shape and strides with a power-of-two head_dim, got "
                         f"{tuple(q.shape)} {q.stride()} and {tuple(k.shape)} {k.stride()}")
    qa = torch.empty(B, H, n, D, dtype=torch.float32, device=q.device)
    ka = torch.empty_like(qa)
    _pool_kernel[(n, B * H)](q, k, qa, ka, block_counts, q.stride(0), q.stride(1), q.stride(2),
                             H, n, HEAD_DIM=D, TWO=True, num_warps=warps)
    return qa, ka


@triton.jit
def _compact_kernel(
    T_ptr, CNT_ptr, IDX_ptr,
    t_b, t_h, t_r, t_c,
    c_b, c_h,
    i_b, i_h, i_r,
    H, NC,
    BLOCK: tl.constexpr,
):
    """Row compaction of a bool table (any strides), one row per program."""
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, BLOCK)
    ok = cols < NC
    v = tl.load(T_ptr + b * t_b + h * t_h + row * t_r + cols * t_c, mask=ok, other=0)
    keep = (v != 0).to(tl.int32)
    pos = tl.cumsum(keep, axis=0) - 1
    tl.store(IDX_ptr + b * i_b + h * i_h + row * i_r + pos, cols, mask=keep != 0)
    tl.store(CNT_ptr + b * c_b + h * c_h + row, tl.sum(keep, axis=0))


def compact(kept: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts int32 ``[B, H, R]`` and ascending index lists int32 ``[B, H, R, C]`` of a bool table
    ``[B, H, rows, cols]`` (any strides; size-1 batch/head dimensions stay size 1).

    ``transpose=True`` compacts columns instead (the q-side lists the backward pass needs).
    """
    if kept.dtype != torch.bool or kept.dim() != 4:
        raise ValueError(f"compact needs a 4-D bool table, got {kept.dtype} {tuple(kept.shape)}")
    t = kept.view(torch.uint8)
    B, H = t.shape[:2]
    sb, sh, sr, sc = t.stride()
    nr, nc = t.shape[2], t.shape[3]
    if transpose:
        sr, sc = sc, sr
        nr, nc = nc, nr
    counts = torch.empty(B, H, nr, dtype=torch.int32, device=kept.device)
    idx = torch.empty(B, H, nr, nc, dtype=torch.int32, device=kept.device)
    block = triton.next_power_of_2(nc)
    _compact_kernel[(nr, B * H)](
        t, counts, idx, sb, sh, sr, sc,
        counts.stride(0), counts.stride(1), idx.stride(0), idx.stride(1), idx.stride(2),
        H, nc, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return counts, idx


@triton.jit
def _scores_kernel(QA, KA, OUT, N, div, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """``OUT[bh] = (QA[bh] @ KA[bh]^T) / div`` for float32 ``[BH, N, D]`` block means, one tile a program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    a = tl.load(QA + (bh * N + rm[:, None]) * HEAD_DIM + d[None, :], mask=(rm < N)[:, None], other=0.0)
    bt = tl.load(KA + (bh * N + rn[:, None]) * HEAD_DIM + d[None, :], mask=(rn < N)[:, None], other=0.0)
    s = tl.math.div_rn(tl.dot(a, tl.trans(bt), input_precision=PRECISION), div)
    tl.store(OUT + (bh * N + rm[:, None]) * N + rn[None, :], s, mask=(rm < N)[:, None] & (rn < N)[None, :])


def block_scores(qa: torch.Tensor, ka: torch.Tensor, precision: str = "tf32x3", *, block: int = 64,
                 warps: int = 4) -> torch.Tensor:
    """NABLA's block scores ``qa @ ka^T / sqrt(D)`` in float32, ``[B, H, N, N]`` from ``[B, H, N, D]`` means.

    The product runs on tensor cores as three TF32 products (``tf32x3``: the operands split into a
    TF32 head and remainder), whose error is that of a float32 product; ``"ieee"`` computes it on the
    CUDA cores. Head dims the kernel does not serve go to ``torch.matmul``.
    """
    B, H, N, D = qa.shape
    div = math.sqrt(D)
    if ka.shape != qa.shape or D not in (16, 32, 64, 128, 256):
        return (qa @ ka.transpose(-1, -2)) / div
    qa, ka = qa.contiguous(), ka.contiguous()
    out = torch.empty(B, H, N, N, dtype=torch.float32, device=qa.device)
    grid = (-(-N // block), -(-N // block), B * H)
    _scores_kernel[grid](qa, ka, out, N, div, HEAD_DIM=D, BLOCK=block, PRECISION=precision, num_warps=warps)
    return out
