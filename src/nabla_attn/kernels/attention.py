"""Block-sparse flash attention over NABLA block tables, forward and backward, in Triton.

Tensors are in the tiled layout ``[B, H, S, D]`` (``S = num_blocks * 64``; see ``grid.py``): every
64-token key block is one contiguous slab of 64 rows, its first ``count`` rows real, the rest zero
padding that the kernels mask to ``-inf``. One program owns one query tile and walks a compact list
of its kept key blocks (``counts [B,H,Qt]``, ``indices [B,H,Qt,Kb]``; lists of size-1 batch/head
dimensions broadcast through zero strides), so the work is proportional to the kept blocks.

Query tiles are ``BLOCK_M`` = 64 or 128 rows. A 64-row table (``query_block=64``) can also run on
128-row tiles (``SUBMASK``): the program walks the union of its two rows' lists and masks each
64-row half with its own table bit, which keeps the exact 64x64 semantics while using the larger
(faster) tile. ``PAIR`` processes two listed key blocks per step (a 128-wide key tile gathered from
two 64-row slabs), halving the loop overhead and softmax rescales.

On Hopper the kernels fetch their listed tiles by tensor descriptors (``TMA``; one listed key block
is one 64 x D box). Where the layout has no padding slot (``PAD`` False) no per-score validity mask
is applied; with padding, only partial blocks are masked (``PAD_BRANCH``).

Softmax runs in base 2: the running max and the saved log-sum-exp are in units of
``score * scale * log2(e)``, and for a positive scale the scaling folds into the ``exp2`` argument
(``FOLD``). A query row with no kept key gets output 0 and log-sum-exp ``+inf``, so its backward
terms are exactly 0.

Backward: dQ over the kv lists (the same program computes ``delta = rowsum(dO * O)`` of its rows),
then dK/dV over the transposed (q-side) lists, one program per 64-key block, so no atomics are needed;
on Hopper both load their listed tiles by tensor descriptors (``TMA``).

Measurements behind each choice: ``docs/kernel-notes.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    # float32 inputs: full-precision dot (the default on NVIDIA is tf32, ~1e-3 relative error).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_tile(IDX_row, BCNT, j, cnt, PAIR: tl.constexpr):
    """Token rows, per-column validity and block ids of the key tile at list position ``j``."""
    if PAIR:
        offs = tl.arange(0, 128)
        second = offs >= 64
        kb0 = tl.load(IDX_row + j)
        has2 = (j + 1) < cnt
        kb1 = tl.load(IDX_row + j + 1, mask=has2, other=0)
        kb1 = tl.where(has2, kb1, kb0)
        n0 = tl.load(BCNT + kb0)
        n1 = tl.load(BCNT + kb1)
        kb = tl.where(second, kb1, kb0)
        within = offs & 63
        ok = (within < tl.where(second, n1, n0)) & ((offs < 64) | has2)
        return kb * 64 + within, ok, kb
    else:
        offs = tl.arange(0, 64)
        kb = tl.load(IDX_row + j)
        ok = offs < tl.load(BCNT + kb)
        return kb * 64 + offs, ok, kb + offs * 0


@triton.jit
def _fwd_update(s, v, m_i, l_i, acc, valid, qk_scale,
                MASKED: tl.constexpr, FOLD: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr):
    """One online-softmax update with raw scores ``s = q.k^T`` of a key tile and its ``v``.

    The running max ``m_i`` and the saved log-sum-exp are in base-2 units (scores x scale x log2 e).
    ``LAZY`` (with ``FOLD``): keep the reference max, and skip rescaling the accumulator, until
    some row's max grows by more than 8; probabilities then stay below 2^8, and the sums stay exact
    because ``acc``, ``l`` and the saved log-sum-exp all use the same reference.
    """
    if FOLD:
        # scale > 0: max(s) * scale is the max of the scaled scores, and the scaling folds into
        # the exp2 argument as one fused multiply-add per score.
        if MASKED:
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if LAZY:
            # (m_new > m_i is False for rows still at -inf; a first finite max gives +inf > 8.)
            grow = tl.max(tl.where(m_new > m_i, m_new - m_i, 0.0), 0) > 8.0
            if grow:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_use)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.math.exp2(s * qk_scale - m_ref[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = acc + _mm(p.to(v.dtype), v, IEEE)
            return m_i, l_i, acc
        # Rows that have seen no valid key yet keep m = -inf; subtract 0 instead (no inf - inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        s = s * qk_scale
        if MASKED:
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _block_valid(BCNT, kb, offs_n, sub0, u_r, has_sub1, top, SUBMASK: tl.constexpr):
    """Validity of the scores against listed key block ``kb`` (a scalar): its real slots, and with
    ``SUBMASK`` each 64-row half's own table bit (``[BLOCK_M, 64]``, else ``[1, 64]``)."""
    valid = (offs_n < tl.load(BCNT + kb))[None, :]
    if SUBMASK:
        bit0 = tl.load(sub0 + kb)
        bit1 = tl.load(sub0 + u_r + kb, mask=has_sub1, other=0)
        valid = valid & (tl.where(top, bit0, bit1) != 0)[:, None]
    return valid


@triton.jit
def _rows(X, x_off, s_s, rows, offs_d, n_rows, desc_row, BOUNDED: tl.constexpr, TMA: tl.constexpr):
    """Consecutive token rows ``rows`` of one (batch, head) of ``X``.

    ``TMA``: ``X`` is a tensor descriptor over the ``[B*H*S, D]`` view and the rows are one box at
    ``desc_row`` (callers only ask for boxes inside the head). Else a pointer load at offset
    ``x_off``; ``BOUNDED`` reads rows ``>= n_rows`` as zeros.
    """
    if TMA:
        return X.load([desc_row, 0])
    else:
        ptrs = X + x_off + rows[:, None] * s_s + offs_d[None, :]
        if BOUNDED:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _query_tile(H, S, BLOCK_M: tl.constexpr):
    """A query-tile program's indices: tile, batch*head, batch, head, its token rows, which are real."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, bh, bh // H, bh % H, offs_m, offs_m < S


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CNT, IDX, BCNT, SUB,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    c_b, c_h, i_b, i_h, i_r, u_b, u_h, u_r,
    H, S, NQ64, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PAIR: tl.constexpr,
    SUBMASK: tl.constexpr, IEEE: tl.constexpr, PAD: tl.constexpr, FOLD: tl.constexpr,
    PREFETCH: tl.constexpr, PAD_BRANCH: tl.constexpr, LAZY: tl.constexpr, TMA: tl.constexpr,
):
    """``TMA``: K and V are tensor descriptors (Hopper's bulk copy engine) over ``[B*H*S, D]`` with
    64 x D boxes; one listed key block is exactly one box, so the copy needs no gather.
    ``PAD``: some key blocks have padding slots (else no per-score validity mask is applied);
    ``PAD_BRANCH``: then mask only the scores of partial blocks, behind a uniform branch.
    ``FOLD``: the softmax scale is positive and folds into exp2. ``PREFETCH``: the next key tile's
    scores are issued before this tile's softmax (software-pipelined Q.K^T). ``PAIR``: two listed
    blocks per step (pointer loads only)."""
    pid_m, bh, b, h, offs_m, row_ok = _query_tile(H, S, BLOCK_M)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _rows(Q, b * sq_b + h * sq_h, sq_s, offs_m, offs_d, S, 0, True, False)
    cnt = tl.load(CNT + b * c_b + h * c_h + pid_m)
    idx_row = IDX + b * i_b + h * i_h + pid_m * i_r
    k_off = b * sk_b + h * sk_h
    v_off = b * sv_b + h * sv_h
    row0 = bh * S
    # Per-half table bits of a 64-row table on 128-row tiles (unused, and compiled away, otherwise).
    sub0 = SUB + b * u_b + h * u_h + (2 * pid_m) * u_r
    has_sub1 = 2 * pid_m + 1 < NQ64
    top = offs_m < pid_m * BLOCK_M + 64
    MASKED: tl.constexpr = PAD or SUBMASK or PAIR

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if PREFETCH:
        kb_next = tl.load(idx_row, mask=cnt > 0, other=0)
        k = _rows(K, k_off, sk_s, kb_next * 64 + offs_n, offs_d, S, row0 + kb_next * 64, False, TMA)
        s_next = _mm(q, tl.trans(k), IEEE)
        for j in range(0, cnt):
            s = s_next
            kb = tl.load(idx_row + j)
            v = _rows(V, v_off, sv_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
            # The last step recomputes its own tile instead of reading past the list.
            kb_next = tl.load(idx_row + tl.minimum(j + 1, cnt - 1))
            k = _rows(K, k_off, sk_s, kb_next * 64 + offs_n, offs_d, S, row0 + kb_next * 64, False, TMA)
            s_next = _mm(q, tl.trans(k), IEEE)
            valid = _block_valid(BCNT, kb, offs_n, sub0, u_r, has_sub1, top, SUBMASK)
            m_i, l_i, acc = _fwd_update(s, v, m_i, l_i, acc, valid, qk_scale, MASKED, FOLD, IEEE, LAZY)
    elif PAIR:
        for j in range(0, cnt, 2):
            tok, ok_n, kb = _key_tile(idx_row, BCNT, j, cnt, True)
            k = tl.load(K + k_off + tok[:, None] * sk_s + offs_d[None, :])
            v = tl.load(V + v_off + tok[:, None] * sv_s + offs_d[None, :])
            valid = ok_n[None, :]
            if SUBMASK:
                bit0 = tl.load(sub0 + kb)
                bit1 = tl.load(sub0 + u_r + kb, mask=(kb >= 0) & has_sub1, other=0)
                valid = valid & (tl.where(top[:, None], bit0[None, :], bit1[None, :]) != 0)
            s = _mm(q, tl.trans(k), IEEE)
            m_i, l_i, acc = _fwd_update(s, v, m_i, l_i, acc, valid, qk_scale, MASKED, FOLD, IEEE, LAZY)
    else:
        for j in range(0, cnt):
            kb = tl.load(idx_row + j)
            k = _rows(K, k_off, sk_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
            v = _rows(V, v_off, sv_s, kb * 64 + offs_n, offs_d, S, row0 + kb * 64, False, TMA)
            s = _mm(q, tl.trans(k), IEEE)
            if PAD_BRANCH and PAD and not SUBMASK:
                # Only edge blocks hold padding: mask the scores of those alone.
                nval = tl.load(BCNT + kb)
                if nval < 64:
                    s = tl.where((offs_n < nval)[None, :], s, float("-inf"))
                m_i, l_i, acc = _fwd_update(s, v, m_i, l_i, acc, s, qk_scale, False, FOLD, IEEE, LAZY)
            else:
                valid = _block_valid(BCNT, kb, offs_n, sub0, u_r, has_sub1, top, SUBMASK)
                m_i, l_i, acc = _fwd_update(s, v, m_i, l_i, acc, valid, qk_scale, MASKED, FOLD, IEEE, LAZY)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(has, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh * S + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, CNT, IDX, BCNT, SUB,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, sd_b, sd_h, sd_s,
    c_b, c_h, i_b, i_h, i_r, u_b, u_h, u_r,
    H, S, NQ64, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, SUBMASK: tl.constexpr, IEEE: tl.constexpr,
    PAD: tl.constexpr, TMA: tl.constexpr, LIST_SHIFT: tl.constexpr,
):
    """dQ over the kv lists, and ``delta = rowsum(dO * O)`` of the tile for the dK/dV kernel that
    runs next (dO is loaded here anyway). ``TMA``: K and V are tensor descriptors, as in
    :func:`_attn_fwd`. ``LIST_SHIFT`` 1: the lists are a 128-row table's, tile ``i`` reads row ``i // 2``."""
    pid_m, bh, b, h, offs_m, row_ok = _query_tile(H, S, BLOCK_M)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _rows(Q, b * sq_b + h * sq_h, sq_s, offs_m, offs_d, S, 0, True, False)
    do = _rows(DO, b * sd_b + h * sd_h, sd_s, offs_m, offs_d, S, 0, True, False)
    lse = tl.load(LSE + bh * S + offs_m, mask=row_ok, other=float("inf"))
    o = _rows(O, b * so_b + h * so_h, so_s, offs_m, offs_d, S, 0, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * S + offs_m, delta, mask=row_ok)
    list_row = pid_m >> LIST_SHIFT
    cnt = tl.load(CNT + b * c_b + h * c_h + list_row)
    idx_row = IDX + b * i_b + h * i_h + list_row * i_r
    k_off = b * sk_b + h * sk_h
    v_off = b * sv_b + h * sv_h
    sub0 = SUB + b * u_b + h * u_h + (2 * pid_m) * u_r
    has_sub1 = 2 * pid_m + 1 < NQ64
    top = offs_m < pid_m * BLOCK_M + 64
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        kb = tl.load(idx_row + j)
        k = _rows(K, k_off, sk_s, kb * 64 + offs_n, offs_d, S, bh * S + kb * 64, False, TMA)
        v = _rows(V, v_off, sv_s, kb * 64 + offs_n, offs_d, S, bh * S + kb * 64, False, TMA)
        p = tl.math.exp2(_mm(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        if PAD or SUBMASK:
            p = tl.where(_block_valid(BCNT, kb, offs_n, sub0, u_r, has_sub1, top, SUBMASK), p, 0.0)
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, QCNT, QIDX, BCNT, SUB,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sd_b, sd_h, sd_s,
    c_b, c_h, i_b, i_h, i_r, u_b, u_h, u_r,
    H, S, NQ64, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, SUBMASK: tl.constexpr, IEEE: tl.constexpr,
    PAD: tl.constexpr, TMA: tl.constexpr,
):
    """dK, dV over the q-side lists, one program per key block. ``TMA`` (64-row query tiles, so a
    tile never crosses a head): Q and DO are tensor descriptors with ``BLOCK_M`` x D boxes."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, 64)
    tok = kb * 64 + offs_n
    offs_d = tl.arange(0, HEAD_DIM)
    ok_n = offs_n < tl.load(BCNT + kb)
    k = tl.load(K + b * sk_b + h * sk_h + tok[:, None] * sk_s + offs_d[None, :])
    v = tl.load(V + b * sv_b + h * sv_h + tok[:, None] * sv_s + offs_d[None, :])
    cnt = tl.load(QCNT + b * c_b + h * c_h + kb)
    idx_row = QIDX + b * i_b + h * i_h + kb * i_r
    q_off = b * sq_b + h * sq_h
    do_off = b * sd_b + h * sd_h
    sub_base = SUB + b * u_b + h * u_h + kb
    dk = tl.zeros([64, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([64, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        qt = tl.load(idx_row + j)
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        ok_m = offs_m < S
        q = _rows(Q, q_off, sq_s, offs_m, offs_d, S, bh * S + qt * BLOCK_M, True, TMA)
        do = _rows(DO, do_off, sd_s, offs_m, offs_d, S, bh * S + qt * BLOCK_M, True, TMA)
        lse = tl.load(LSE + bh * S + offs_m, mask=ok_m, other=float("inf"))
        delta = tl.load(DELTA + bh * S + offs_m, mask=ok_m, other=0.0)
        # Query rows past S load lse = +inf, so their probabilities are exactly 0 without a mask.
        p_t = tl.math.exp2(_mm(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])
        if PAD or SUBMASK:
            valid = ok_n[:, None] & ok_m[None, :]
            if SUBMASK:
                bit0 = tl.load(sub_base + (2 * qt) * u_r)
                bit1 = tl.load(sub_base + (2 * qt + 1) * u_r, mask=2 * qt + 1 < NQ64, other=0)
                top = offs_m < qt * BLOCK_M + 64
                valid = valid & (tl.where(top, bit0, bit1) != 0)[None, :]
            p_t = tl.where(valid, p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, IEEE)
        dp_t = _mm(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mm(ds_t.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    tl.store(DK + b * sk_b + h * sk_h + tok[:, None] * sk_s + offs_d[None, :], dk.to(DK.dtype.element_ty))
    tl.store(DV + b * sv_b + h * sv_h + tok[:, None] * sv_s + offs_d[None, :], dv.to(DV.dtype.element_ty))
