"""Block-sparse flash attention over NABLA block tables, forward and backward, in Triton.

Tensors are in the tiled layout ``[B, H, S, D]`` (``S = num_blocks * 64``): every 64-token key block
is one contiguous slab of 64 rows, its first ``count`` rows real, the rest zero padding that the
kernels mask to ``-inf``. One program owns one query tile and walks a compact list of its kept key
blocks (``counts [B,H,Qt]``, ``indices [B,H,Qt,Kb]``; lists of size-1 batch/head dimensions
broadcast through zero strides), so the work is proportional to the kept blocks.

Query tiles are ``BLOCK_M`` = 64 or 128 rows, one tile per row of the table. On Hopper the kernels
fetch their listed tiles by tensor descriptors (``TMA``; one listed key block is one 64 x D box).
Where the layout has no padding slot (``PAD`` False) no per-score validity mask is applied; with
padding, only the scores of partial blocks are masked, behind a uniform branch.

Softmax runs in base 2: the running max and the saved log-sum-exp are in units of
``score * scale * log2(e)``, and for a positive scale the scaling folds into the ``exp2`` argument
(``FOLD``). A query row with no kept key gets output 0 and log-sum-exp ``+inf``, so its backward
terms are exactly 0.

Backward: dQ over the kv lists (the same program computes ``delta = rowsum(dO * O)`` of its rows),
then dK/dV over the transposed (q-side) lists, one program per 64-key block, so no atomics are needed.

Every offset that grows with batch, heads or sequence is computed in 64 bits: a bf16 tensor of
8 x 40 x 67,200 x 128 elements is past 2^31. Measurements behind each choice: ``docs/kernel-notes.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import BLOCK_TOKENS

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    # float32 inputs: full-precision dot (the default on NVIDIA is tf32, ~1e-3 relative error).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_update(s, v, m_i, l_i, acc, qk_scale, FOLD: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax update with raw scores ``s = q.k^T`` (padding already at ``-inf``)."""
    if FOLD:
        # scale > 0: max(s) * scale is the max of the scaled scores, and the scaling folds into
        # the exp2 argument as one fused multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # Rows that have seen no valid key yet keep m = -inf; subtract 0 instead (no inf - inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _rows(X, x_off, s_s, rows, offs_d, n_rows, desc_row, BOUNDED: tl.constexpr, TMA: tl.constexpr):
    """Consecutive token rows ``rows`` of one (batch, head) of ``X``.

    ``TMA``: ``X`` is a tensor descriptor over the ``[B*H*S, D]`` view and the rows are one box at
    ``desc_row`` (callers only ask for boxes inside the head). Else a pointer load at the int64
    offset ``x_off``; ``BOUNDED`` reads rows ``>= n_rows`` as zeros.
    """
    if TMA:
        # Box coordinates are 32-bit in the copy engine (B*H*S rows stay far below 2^31).
        return X.load([desc_row.to(tl.int32), 0])
    else:
        ptrs = X + x_off + rows.to(tl.int64)[:, None] * s_s + offs_d[None, :]
        if BOUNDED:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def program_ids(H, S, BLOCK_M: tl.constexpr):
    """A query-tile program's indices: tile, batch*head, batch, head (int64), its token rows, which are real."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, bh, bh // H, bh % H, offs_m, offs_m < S


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CNT, IDX, BCNT,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    c_b, c_h, i_b, i_h, i_r,
    H, S, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, PAD: tl.constexpr,
    FOLD: tl.constexpr, TMA: tl.constexpr,
):
    """``TMA``: K and V are tensor descriptors (Hopper's bulk copy engine) over ``[B*H*S, D]`` with
    64 x D boxes; one listed key block is exactly one box, so the copy needs no gather.
    ``PAD``: some key blocks have padding slots. ``FOLD``: the scale is positive and folds into exp2."""
    pid_m, bh, b, h, offs_m, row_ok = program_ids(H, S, BLOCK_M)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _rows(Q, b * sq_b + h * sq_h, sq_s, offs_m, offs_d, S, 0, True, False)
    cnt = tl.load(CNT + b * c_b + h * c_h + pid_m)
    idx_row = IDX + b * i_b + h * i_h + pid_m * i_r
    k_off = b * sk_b + h * sk_h
    v_off = b * sv_b + h * sv_h
    row0 = bh * S

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        kb = tl.load(idx_row + j)
        k = _rows(K, k_off, sk_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
        v = _rows(V, v_off, sv_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
        s = _mm(q, tl.trans(k), IEEE)
        if PAD:
            # Only edge and text blocks hold padding: mask the scores of those alone.
            nval = tl.load(BCNT + kb)
            if nval < 64:
                s = tl.where((offs_n < nval)[None, :], s, float("-inf"))
        m_i, l_i, acc = _fwd_update(s, v, m_i, l_i, acc, qk_scale, FOLD, IEEE)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m.to(tl.int64)[:, None] * so_s + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, CNT, IDX, BCNT,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, sd_b, sd_h, sd_s,
    c_b, c_h, i_b, i_h, i_r,
    H, S, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, PAD: tl.constexpr,
    TMA: tl.constexpr, LIST_SHIFT: tl.constexpr,
):
    """dQ over the kv lists, and ``delta = rowsum(dO * O)`` of the tile for the dK/dV kernel that
    runs next (dO is loaded here anyway). ``TMA``: K and V are tensor descriptors, as in
    :func:`_attn_fwd`. ``LIST_SHIFT`` 1: the lists are a 128-row table's, tile ``i`` reads row ``i // 2``."""
    pid_m, bh, b, h, offs_m, row_ok = program_ids(H, S, BLOCK_M)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _rows(Q, b * sq_b + h * sq_h, sq_s, offs_m, offs_d, S, 0, True, False)
    do = _rows(DO, b * sd_b + h * sd_h, sd_s, offs_m, offs_d, S, 0, True, False)
    row0 = bh * S
    lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=float("inf"))
    o = _rows(O, b * so_b + h * so_h, so_s, offs_m, offs_d, S, 0, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row0 + offs_m, delta, mask=row_ok)
    list_row = pid_m >> LIST_SHIFT
    cnt = tl.load(CNT + b * c_b + h * c_h + list_row)
    idx_row = IDX + b * i_b + h * i_h + list_row * i_r
    k_off = b * sk_b + h * sk_h
    v_off = b * sv_b + h * sv_h
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        kb = tl.load(idx_row + j)
        k = _rows(K, k_off, sk_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
        v = _rows(V, v_off, sv_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
        p = tl.math.exp2(_mm(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        if PAD:
            p = tl.where((offs_n < tl.load(BCNT + kb))[None, :], p, 0.0)
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + b * sq_b + h * sq_h + offs_m.to(tl.int64)[:, None] * sq_s + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, QCNT, QIDX, BCNT,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sd_b, sd_h, sd_s,
    c_b, c_h, i_b, i_h, i_r,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, PAD: tl.constexpr, TMA: tl.constexpr,
):
    """dK, dV over the q-side lists of a 64-row table, one program per key block. ``TMA``: Q and DO
    are tensor descriptors with 64 x D boxes (a 64-row tile never crosses a head)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, 64)
    tok = (kb * 64 + offs_n).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ok_n = offs_n < tl.load(BCNT + kb)
    k = tl.load(K + b * sk_b + h * sk_h + tok[:, None] * sk_s + offs_d[None, :])
    v = tl.load(V + b * sv_b + h * sv_h + tok[:, None] * sv_s + offs_d[None, :])
    cnt = tl.load(QCNT + b * c_b + h * c_h + kb)
    idx_row = QIDX + b * i_b + h * i_h + kb * i_r
    q_off = b * sq_b + h * sq_h
    do_off = b * sd_b + h * sd_h
    row0 = bh * S
    dk = tl.zeros([64, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([64, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        qt = tl.load(idx_row + j)
        offs_m = qt * 64 + tl.arange(0, 64)
        ok_m = offs_m < S
        q = _rows(Q, q_off, sq_s, offs_m, offs_d, S, row0 + qt * 64, True, TMA)
        do = _rows(DO, do_off, sd_s, offs_m, offs_d, S, row0 + qt * 64, True, TMA)
        lse = tl.load(LSE + row0 + offs_m, mask=ok_m, other=float("inf"))
        delta = tl.load(DELTA + row0 + offs_m, mask=ok_m, other=0.0)
        # Query rows past S load lse = +inf, so their probabilities are exactly 0 without a mask.
        p_t = tl.math.exp2(_mm(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])
        if PAD:
            p_t = tl.where(ok_n[:, None], p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, IEEE)
        dp_t = _mm(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mm(ds_t.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    tl.store(DK + b * sk_b + h * sk_h + tok[:, None] * sk_s + offs_d[None, :], dk.to(DK.dtype.element_ty))
    tl.store(DV + b * sv_b + h * sv_h + tok[:, None] * sv_s + offs_d[None, :], dv.to(DV.dtype.element_ty))


# ------------------------------------------------------------------------------------- launchers
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def bh_strides(t: torch.Tensor) -> tuple[int, int]:
    """Batch/head strides with broadcast (size-1) dimensions read through stride 0."""
    return (t.stride(0) if t.shape[0] != 1 else 0, t.stride(1) if t.shape[1] != 1 else 0)


def has_tma(q: torch.Tensor) -> bool:
    """Hopper or newer (the bulk tensor copy engine), or the interpreter, which emulates it."""
    if q.is_cuda:
        return torch.cuda.get_device_capability(q.device) >= (9, 0)
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _descriptor(x: torch.Tensor) -> object:
    """A tensor descriptor over contiguous ``[B, H, S, D]`` viewed as ``[B*H*S, D]``, 64 x D boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, S, D = x.shape
    return TensorDescriptor.from_tensor(x.view(B * H * S, D), [BLOCK_TOKENS, D])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
            block_counts: torch.Tensor, scale: float, *, tile_m: int, padded: bool, tma: bool,
            warps: int = 4, stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, S, D]`` and base-2 log-sum-exp ``[B, H, S]`` float32 of contiguous tiled q, k, v.

    ``counts``/``indices``: kv lists of a table with ``tile_m``-token rows (one row per tile);
    ``block_counts``: real tokens per key block (int32); ``padded``: some block has fewer than 64.
    ``tma`` uses tensor descriptors for K and V (Hopper)."""
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    kk, vv = (_descriptor(k), _descriptor(v)) if tma else (k, v)
    _attn_fwd[(-(-S // tile_m), B * H)](
        q, kk, vv, o, lse, counts, indices, block_counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        *bh_strides(counts), *bh_strides(indices), indices.stride(2),
        H, S, scale * LOG2E,
        BLOCK_M=tile_m, HEAD_DIM=D, IEEE=q.dtype == torch.float32, PAD=padded, FOLD=scale > 0, TMA=tma,
        num_warps=warps if tile_m == 128 else 4, num_stages=stages,
    )  # fmt: skip
    return o, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor, q_counts: torch.Tensor,
             q_indices: torch.Tensor, block_counts: torch.Tensor, scale: float, *, list_shift: int,
             padded: bool, tma: bool, dq_warps: int = 4, dq_stages: int = 2, dkdv_warps: int = 4,
             dkdv_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv on 64-row tiles. ``counts``/``indices``: kv lists of the forward's table (rows of
    ``64 << list_shift`` tokens); ``q_counts``/``q_indices``: per key block, the 64-token query
    tiles that keep it. All of q, k, v, o, do contiguous."""
    B, H, S, D = q.shape
    # Written by the dQ kernel, read by the dK/dV kernel.
    delta = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kk, vv = (_descriptor(k), _descriptor(v)) if tma else (k, v)
    qq, dd = (_descriptor(q), _descriptor(do)) if tma else (q, do)
    ieee = q.dtype == torch.float32
    _attn_bwd_dq[(S // BLOCK_TOKENS, B * H)](
        q, kk, vv, o, do, dq, lse, delta, counts, indices, block_counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
        *bh_strides(counts), *bh_strides(indices), indices.stride(2),
        H, S, scale * LOG2E, scale,
        BLOCK_M=BLOCK_TOKENS, HEAD_DIM=D, IEEE=ieee, PAD=padded, TMA=tma, LIST_SHIFT=list_shift,
        num_warps=dq_warps, num_stages=dq_stages,
    )  # fmt: skip
    _attn_bwd_dkdv[(S // BLOCK_TOKENS, B * H)](
        qq, k, v, dd, dk, dv, lse, delta, q_counts, q_indices, block_counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *bh_strides(q_counts), *bh_strides(q_indices), q_indices.stride(2),
        H, S, scale * LOG2E, scale,
        HEAD_DIM=D, IEEE=ieee, PAD=padded, TMA=tma, num_warps=dkdv_warps, num_stages=dkdv_stages,
    )  # fmt: skip
    return dq, dk, dv
