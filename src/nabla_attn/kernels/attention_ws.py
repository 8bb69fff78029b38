"""Warp-specialised block-sparse attention forward for Hopper, written in Gluon.

Same contract as the Triton forward (:func:`nabla_attn.kernels.attention.forward`) for 128-row
and 64-row query tables (one list of kept 64-token key blocks per query block; tiled
``[B*H*S, D]`` tensors): writes ``O`` and the base-2 log-sum-exp, and a row with no kept key gets
output 0 and log-sum-exp ``+inf``.

Why a second kernel: the Triton kernel runs the softmax and the tensor-core products of one tile in
one instruction stream, so each waits for the other (docs/kernel-notes.md, v9-v20). Here one CTA
holds three partitions, as in FlashAttention-3:
- a 1-warp producer issues the TMA copies of Q and of each step's K and V into a ring of
  ``NUM_STAGES`` shared-memory slots, and refills a slot once both consumers released it;
- two 4-warp consumers each own 64 of the tile's 128 query rows. Each issues the next step's
  ``Q.K^T`` asynchronously before this step's ``P.V`` and runs the softmax while both products are
  in flight, so the tensor cores and the FMA/exp units work at the same time. The two consumers
  share every K/V copy.
A step covers two listed key blocks (128 keys): half the accumulator rescales, row reductions and
barrier waits per key of one-block steps.

64-row tables (the paper's 64x64 blocks) give each 64-row query block its own list. One program
still holds two of them, one per consumer, because the cost there is the K/V traffic from L2, not
the arithmetic: a 64-row block reuses each loaded K/V block for 64 queries only (giving each
consumer its own list and ring runs no faster than the Triton kernel, kernel-notes v29). So the
producer streams the *union* of the two lists, one block per slot, each K/V block once, and each
consumer computes only the blocks its own list holds (:func:`_consumer_union`); neighbouring query
blocks of a video keep mostly the same key blocks, so the union is far shorter than the two lists.
Which two blocks share a program is the caller's choice (``pairs``; the backend pairs the same tile
of consecutive frames, whose lists are closest in length, since a program lasts as long as its
longer list).

Registers are rebalanced per partition (``setmaxnreg``): 240 per consumer thread, 24 for the
producer.

Gluon is Triton's experimental dialect and its API moves between releases: the kernel runs on the
release series it was validated on (:func:`gluon_validated`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ..constants import BLOCK_TOKENS

ROWS = gl.constexpr(64)  # query rows per consumer, and tokens per key block
LOG2E = 1.4426950408889634
SMEM_BYTES = 227 * 1024  # shared memory per CTA on Hopper


@gluon.constexpr_function
def _mma_layout(n):
    """The register layout of a consumer warpgroup's wgmma result with ``n`` columns (64 rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _step_counts(IDX_row, BCNT, step, cnt, PAD: gl.constexpr):
    """Real tokens in the two key blocks of one step: ``(n0, n1)`` for list entries ``2*step`` and
    ``2*step + 1`` (``n1`` = 0 past the list's end). Without ``PAD`` every block is whole (64).
    (``ROWS + 0 * cnt`` makes the constant a runtime scalar, the type the loaded counts have.)"""
    j0 = 2 * step
    has2 = j0 + 1 < cnt
    if PAD:
        n0 = gl.load(BCNT + gl.load(IDX_row + j0))
        n1 = gl.load(BCNT + gl.load(IDX_row + gl.minimum(j0 + 1, cnt - 1)))
    else:
        n0 = ROWS + 0 * cnt
        n1 = ROWS + 0 * cnt
    n1 = gl.where(has2, n1, 0)
    return n0, n1


@gluon.jit
def _masked_scores(s, n0, n1, col_layout: gl.constexpr):
    """Scores against a step's two key blocks with their padding slots (and a missing second block)
    at ``-inf``. The branch is uniform: only edge blocks and a list's odd last step take it."""
    if (n0 < ROWS) | (n1 < ROWS):
        cols = gl.arange(0, 2 * ROWS, layout=col_layout)
        ok = gl.where(cols < ROWS, cols < n0, cols - ROWS < n1)
        s = gl.where(gl.expand_dims(ok, 0), s, float("-inf"))
    return s


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale):
    """Online-softmax update in base 2 (``qk_scale`` = scale * log2 e > 0, folded into exp2)."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    # Rows that have seen no valid key keep m = -inf; subtract 0 there (no inf - inf).
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    return m_new, l_i, p, alpha


# The consumer and producer take the same arguments: Gluon requires one signature for all worker
# partitions (the second consumer runs as a worker), so each ignores what it does not use.
@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
              O, LSE, ROWMAP, o_off, o_s, BCNT, IDX_row, cnt, row0, tile_row, S, qk_scale,
              HALF: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, PAD: gl.constexpr,
              NATURAL: gl.constexpr):
    BLOCK_N: gl.constexpr = 2 * ROWS
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = K_desc.dtype

    q = q_smem.index(HALF)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    steps = (cnt + 1) // 2
    mbarrier.wait(q_bar, 0)
    if steps > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
        # Block counts are read one step ahead, so their two dependent loads never stall the loop.
        n0, n1 = _step_counts(IDX_row, BCNT, gl.minimum(1, steps - 1), cnt, PAD)
        c0, c1 = _step_counts(IDX_row, BCNT, 0, cnt, PAD)
        s = warpgroup_mma_wait(0, deps=(s, ))
        s = _masked_scores(s, c0, c1, col_s)
        m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i, qk_scale)
        p = p.to(dtype)
        for j in range(steps - 1):
            st = j % NUM_STAGES
            nx = j + 1
            st_nx = nx % NUM_STAGES
            # Issue the next step's scores, then this step's P.V; the softmax of the next step
            # waits only for the first (wgmma groups complete in order) and runs while P.V does.
            mbarrier.wait(k_ready.index(st_nx), (nx // NUM_STAGES) & 1)
            s = warpgroup_mma(q, k_bufs.index(st_nx).permute((1, 0)), s, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(st), (j // NUM_STAGES) & 1)
            acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_bufs.index(st), acc, is_async=True)
            a0, a1 = _step_counts(IDX_row, BCNT, gl.minimum(nx + 1, steps - 1), cnt, PAD)
            s = warpgroup_mma_wait(1, deps=(s, ))
            s = _masked_scores(s, n0, n1, col_s)
            n0, n1 = a0, a1
            m_i, l_i, p_f, alpha = _softmax_step(s, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(kv_empty.index(st), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p = p_f.to(dtype)
        last = steps - 1
        st = last % NUM_STAGES
        mbarrier.wait(v_ready.index(st), (last // NUM_STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_bufs.index(st), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(kv_empty.index(st), count=1)

    _epilogue(acc, m_i, l_i, O, LSE, ROWMAP, o_off, o_s, row0, tile_row + HALF * ROWS, S, HEAD_DIM, s_layout,
              o_layout, dtype, NATURAL)


@gluon.jit
def _epilogue(acc, m_i, l_i, O, LSE, ROWMAP, o_off, o_s, row0, first, S, HEAD_DIM: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, dtype: gl.constexpr, NATURAL: gl.constexpr):
    """Normalise and store a consumer's 64 rows starting at tiled row ``first`` (and their log-sum-exp)
    into the head of ``O`` at ``o_off`` with token stride ``o_s``; ``NATURAL``: ``O`` is in natural
    order, tiled row ``r`` goes to row ``ROWMAP[r]`` (``-1``: padding, not stored)."""
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    # S is a multiple of 64: each consumer's 64 rows are all real or (last tile) all past the end.
    if first < S:
        has = l_i > 0.0
        l_safe = gl.where(has, l_i, 1.0)
        out = (acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)).to(dtype)
        rows = first + gl.arange(0, ROWS, layout=row_o)
        cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout)), 0)
        if NATURAL:
            dst = gl.load(ROWMAP + rows).to(gl.int64)
            gl.store(O + o_off + gl.expand_dims(dst * o_s, 1) + cols, out, mask=gl.expand_dims(dst >= 0, 1))
        else:
            gl.store(O + o_off + gl.expand_dims(rows.to(gl.int64) * o_s, 1) + cols, out)
        lse = gl.where(has, m_i + gl.log2(l_safe), float("inf"))
        gl.store(LSE + (row0 + first + gl.arange(0, ROWS, layout=row_s)).to(gl.int64), lse)


@gluon.jit
def _masked_block(s, n, col_layout: gl.constexpr):
    """Scores against one key block with its padding slots at ``-inf`` (uniform branch)."""
    if n < ROWS:
        cols = gl.arange(0, ROWS, layout=col_layout)
        s = gl.where(gl.expand_dims(cols < n, 0), s, float("-inf"))
    return s


@gluon.jit
def _block_count(IDX_row, BCNT, j, PAD: gl.constexpr):
    """Real tokens of list entry ``j`` (64 without ``PAD``, as a runtime scalar)."""
    if PAD:
        n = gl.load(BCNT + gl.load(IDX_row + j))
    else:
        n = ROWS + 0 * j
    return n


@gluon.jit
def _pass_slots(k_ready, kv_empty, start, stop, NUM_STAGES: gl.constexpr):
    """Release the union slots in ``[start, stop)`` that this consumer does not compute. It still
    waits for each fill: barrier phases are tracked by parity, so a consumer that skipped a fill
    could mistake the slot's previous phase for the one it wants. Only the consumer that computes
    a slot waits for its V copy; that is enough because every union position is in one of the two
    lists (the launcher checks the lists come from the table), so a slot is never refilled while
    its V copy is in flight."""
    for u in range(start, stop):
        mbarrier.wait(k_ready.index(u % NUM_STAGES), (u // NUM_STAGES) & 1)
        mbarrier.arrive(kv_empty.index(u % NUM_STAGES), count=1)


@gluon.jit
def _consumer_union(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                    O, LSE, ROWMAP, o_off, o_s, BCNT, UIDX, IDX0, IDX1, POS0, POS1, cnt0, cnt1, ucnt, row0, first0,
                    first1, S, qk_scale, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                    PAD: gl.constexpr, NATURAL: gl.constexpr):
    """One consumer of a 64-row table: its own list ``IDX`` (``cnt`` blocks) whose entries sit at
    union positions ``POS`` (ascending). Union slots hold one block each; the consumer visits every
    union position in order, computes its own and releases the others (:func:`_pass_slots`).

    Pipelining as in :func:`_consumer`: the next own block's ``Q.K^T`` is issued before this one's
    ``P.V``, holding two slots. That is safe only when the next own block lies fewer than
    ``NUM_STAGES`` positions ahead (the producer must be able to fill it without this consumer's
    current slot); otherwise this block's ``P.V`` finishes and its slot is released first."""
    s_layout: gl.constexpr = _mma_layout(ROWS)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = K_desc.dtype

    q = q_smem.index(HALF)
    if HALF == 0:
        IDX_row = IDX0
        POS_row = POS0
        cnt = cnt0
        first = first0
    else:
        IDX_row = IDX1
        POS_row = POS1
        cnt = cnt1
        first = first1
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    s = gl.zeros([ROWS, ROWS], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    rest = 0
    if cnt > 0:
        a = gl.load(POS_row)
        _pass_slots(k_ready, kv_empty, 0, a, NUM_STAGES)
        mbarrier.wait(k_ready.index(a % NUM_STAGES), (a // NUM_STAGES) & 1)
        s = warpgroup_mma(q, k_bufs.index(a % NUM_STAGES).permute((1, 0)), s, use_acc=False, is_async=True)
        # The next entry's position and token count are read one step ahead (no load stalls).
        b = gl.load(POS_row + gl.minimum(1, cnt - 1))
        n_b = _block_count(IDX_row, BCNT, gl.minimum(1, cnt - 1), PAD)
        n_a = _block_count(IDX_row, BCNT, 0, PAD)
        s = warpgroup_mma_wait(0, deps=(s, ))
        s = _masked_block(s, n_a, col_s)
        m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i, qk_scale)
        p = p.to(dtype)
        for j in range(cnt - 1):
            ahead = gl.minimum(j + 2, cnt - 1)
            b2 = gl.load(POS_row + ahead)
            n_b2 = _block_count(IDX_row, BCNT, ahead, PAD)
            sa = a % NUM_STAGES
            sb = b % NUM_STAGES
            if b - a < NUM_STAGES:
                _pass_slots(k_ready, kv_empty, a + 1, b, NUM_STAGES)
                mbarrier.wait(k_ready.index(sb), (b // NUM_STAGES) & 1)
                s = warpgroup_mma(q, k_bufs.index(sb).permute((1, 0)), s, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(sa), (a // NUM_STAGES) & 1)
                acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_bufs.index(sa), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s, ))
                s = _masked_block(s, n_b, col_s)
                m_i, l_i, p_f, alpha = _softmax_step(s, m_i, l_i, qk_scale)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                mbarrier.arrive(kv_empty.index(sa), count=1)
            else:
                mbarrier.wait(v_ready.index(sa), (a // NUM_STAGES) & 1)
                acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_bufs.index(sa), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                mbarrier.arrive(kv_empty.index(sa), count=1)
                _pass_slots(k_ready, kv_empty, a + 1, b, NUM_STAGES)
                mbarrier.wait(k_ready.index(sb), (b // NUM_STAGES) & 1)
                s = warpgroup_mma(q, k_bufs.index(sb).permute((1, 0)), s, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                s = _masked_block(s, n_b, col_s)
                m_i, l_i, p_f, alpha = _softmax_step(s, m_i, l_i, qk_scale)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p = p_f.to(dtype)
            a = b
            b = b2
            n_b = n_b2
        sa = a % NUM_STAGES
        mbarrier.wait(v_ready.index(sa), (a // NUM_STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_bufs.index(sa), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(kv_empty.index(sa), count=1)
        rest = a + 1
    _pass_slots(k_ready, kv_empty, rest, ucnt, NUM_STAGES)
    _epilogue(acc, m_i, l_i, O, LSE, ROWMAP, o_off, o_s, row0, first, S, HEAD_DIM, s_layout, o_layout, dtype,
              NATURAL)


@gluon.jit
def _producer_union(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                    O, LSE, ROWMAP, o_off, o_s, BCNT, UIDX, IDX0, IDX1, POS0, POS1, cnt0, cnt1, ucnt, row0, first0,
                    first1, S, qk_scale, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                    PAD: gl.constexpr, NATURAL: gl.constexpr):
    """Q of both blocks, then each block of the union list ``UIDX`` once, K and V into one slot; a
    slot is refilled once both consumers released it. (A missing second block has ``first1 = S``:
    its Q rows are the next head's or past the tensor, zero-filled, and never stored.)"""
    mbarrier.expect(q_bar, 2 * Q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(Q_desc, [row0 + first0, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(Q_desc, [row0 + first1, 0], q_bar, q_smem.index(1))
    nbytes: gl.constexpr = K_desc.block_type.nbytes
    for u in range(ucnt):
        st = u % NUM_STAGES
        mbarrier.wait(kv_empty.index(st), ((u // NUM_STAGES) & 1) ^ 1)
        row = row0 + gl.load(UIDX + u) * ROWS
        mbarrier.expect(k_ready.index(st), nbytes)
        tma.async_copy_global_to_shared(K_desc, [row, 0], k_ready.index(st), k_bufs.index(st))
        mbarrier.expect(v_ready.index(st), nbytes)
        tma.async_copy_global_to_shared(V_desc, [row, 0], v_ready.index(st), v_bufs.index(st))


@gluon.jit
def _producer(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
              O, LSE, ROWMAP, o_off, o_s, BCNT, IDX_row, cnt, row0, tile_row, S, qk_scale,
              HALF: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, PAD: gl.constexpr,
              NATURAL: gl.constexpr):
    # Rows past the head's end belong to the next head (or lie past the tensor: zero-filled); the
    # consumer that gets them never stores its result.
    mbarrier.expect(q_bar, 2 * Q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(Q_desc, [row0 + tile_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(Q_desc, [row0 + tile_row + ROWS, 0], q_bar, q_smem.index(1))
    steps = (cnt + 1) // 2
    nbytes: gl.constexpr = K_desc.block_type.nbytes * 2
    for j in range(steps):
        st = j % NUM_STAGES
        # Slots start free: the first pass waits on the phase before the barrier's first.
        mbarrier.wait(kv_empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
        k_buf = k_bufs.index(st)
        v_buf = v_bufs.index(st)
        # An odd list's last step loads its block twice; the consumers mask the copy.
        row_a = row0 + gl.load(IDX_row + 2 * j) * ROWS
        row_b = row0 + gl.load(IDX_row + gl.minimum(2 * j + 1, cnt - 1)) * ROWS
        mbarrier.expect(k_ready.index(st), nbytes)
        tma.async_copy_global_to_shared(K_desc, [row_a, 0], k_ready.index(st), k_buf.slice(0, ROWS))
        tma.async_copy_global_to_shared(K_desc, [row_b, 0], k_ready.index(st), k_buf.slice(ROWS, ROWS))
        mbarrier.expect(v_ready.index(st), nbytes)
        tma.async_copy_global_to_shared(V_desc, [row_a, 0], v_ready.index(st), v_buf.slice(0, ROWS))
        tma.async_copy_global_to_shared(V_desc, [row_b, 0], v_ready.index(st), v_buf.slice(ROWS, ROWS))


@gluon.jit
def _ring(Q_desc, K_desc, V_desc, SLOT_KEYS: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Shared memory of one program: the two 64-row Q halves, ``NUM_STAGES`` K and V slots of
    ``SLOT_KEYS`` keys, and their barriers (a slot is released by both consumers: count 2)."""
    q_smem = gl.allocate_shared_memory(Q_desc.dtype, [2, ROWS, HEAD_DIM], Q_desc.layout)
    k_bufs = gl.allocate_shared_memory(K_desc.dtype, [NUM_STAGES, SLOT_KEYS, HEAD_DIM], K_desc.layout)
    v_bufs = gl.allocate_shared_memory(V_desc.dtype, [NUM_STAGES, SLOT_KEYS, HEAD_DIM], V_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    return q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty


@gluon.jit
def _attn_fwd_ws(Q_desc, K_desc, V_desc, O, LSE, ROWMAP, CNT, IDX, BCNT, o_b, o_h, o_s, c_b, c_h, i_b, i_h,
                 i_r, H, S, qk_scale, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, PAD: gl.constexpr,
                 NATURAL: gl.constexpr):
    """One program per (128-row query tile, batch*head). ``Q_desc``/``K_desc``/``V_desc``: tensor
    descriptors over contiguous ``[B*H*S, D]`` with 64 x D boxes; ``O`` contiguous like q; ``LSE``
    ``[B*H*S]`` float32; ``O``: the output with strides ``o_b, o_h, o_s``, tiled like q or (``NATURAL``)
    in natural order, each tiled row's row there in ``ROWMAP`` (:func:`_epilogue`); ``CNT``/``IDX``:
    the 128-row table's kv lists; ``BCNT``: real tokens per key block (read only with ``PAD``)."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = (bh // H).to(gl.int64)
    h = (bh % H).to(gl.int64)
    o_off = b * o_b + h * o_h
    cnt = gl.load(CNT + b * c_b + h * c_h + pid_m)
    IDX_row = IDX + b * i_b + h * i_h + pid_m * i_r
    # Box coordinates of the copy engine are 32-bit: B*H*S rows stay far below 2^31.
    row0 = bh * S
    tile_row = pid_m * (2 * ROWS)

    # A slot holds two listed key blocks (a 128-key step).
    q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty = _ring(Q_desc, K_desc, V_desc, 2 * ROWS, HEAD_DIM,
                                                                        NUM_STAGES)

    gl.warp_specialize([
        (_consumer, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                     O, LSE, ROWMAP, o_off, o_s, BCNT, IDX_row, cnt, row0, tile_row, S, qk_scale, 0, HEAD_DIM,
                     NUM_STAGES, PAD, NATURAL)),
        (_consumer, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                     O, LSE, ROWMAP, o_off, o_s, BCNT, IDX_row, cnt, row0, tile_row, S, qk_scale, 1, HEAD_DIM,
                     NUM_STAGES, PAD, NATURAL)),
        (_producer, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                     O, LSE, ROWMAP, o_off, o_s, BCNT, IDX_row, cnt, row0, tile_row, S, qk_scale, 0, HEAD_DIM,
                     NUM_STAGES, PAD, NATURAL)),
    ], [4, 1], [240, 24])


@gluon.jit
def _attn_fwd_union(Q_desc, K_desc, V_desc, O, LSE, ROWMAP, CNT, IDX, UCNT, UIDX, POS, BCNT, PAIRS,
                    o_b, o_h, o_s, c_b, c_h, i_b, i_h, i_r, u_b, u_h, ui_b, ui_h, ui_r, H, S, qk_scale,
                    HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, PAD: gl.constexpr, NATURAL: gl.constexpr):
    """One program per (pair of 64-row query blocks, batch*head) of a 64-row table: ``PAIRS`` the
    two rows of each pair (``-1``: no second row), ``CNT``/``IDX`` the table's kv lists,
    ``UCNT``/``UIDX`` the union list of each pair, ``POS`` (strides of ``IDX``) each own entry's
    position in its pair's union list (:func:`union_lists`)."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = (bh // H).to(gl.int64)
    h = (bh % H).to(gl.int64)
    o_off = b * o_b + h * o_h
    r0 = gl.load(PAIRS + 2 * pid_m)
    r1 = gl.load(PAIRS + 2 * pid_m + 1)
    has1 = r1 >= 0
    r1 = gl.where(has1, r1, r0)
    cnt0 = gl.load(CNT + b * c_b + h * c_h + r0)
    cnt1 = gl.where(has1, gl.load(CNT + b * c_b + h * c_h + r1), 0)
    ucnt = gl.load(UCNT + b * u_b + h * u_h + pid_m)
    UIDX_row = UIDX + b * ui_b + h * ui_h + pid_m * ui_r
    off0 = b * i_b + h * i_h + r0 * i_r
    off1 = b * i_b + h * i_h + r1 * i_r
    row0 = bh * S
    first0 = r0 * ROWS
    # S: the epilogue stores no rows there (and the producer's copy of them is never read).
    first1 = gl.where(has1, r1 * ROWS, S)

    # A slot holds one union block; both consumers release every slot (one computed it, or both).
    q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty = _ring(Q_desc, K_desc, V_desc, ROWS, HEAD_DIM,
                                                                        NUM_STAGES)

    gl.warp_specialize([
        (_consumer_union, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                           O, LSE, ROWMAP, o_off, o_s, BCNT, UIDX_row, IDX + off0, IDX + off1, POS + off0,
                           POS + off1, cnt0, cnt1, ucnt, row0, first0, first1, S, qk_scale, 0, HEAD_DIM,
                           NUM_STAGES, PAD, NATURAL)),
        (_consumer_union, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                           O, LSE, ROWMAP, o_off, o_s, BCNT, UIDX_row, IDX + off0, IDX + off1, POS + off0,
                           POS + off1, cnt0, cnt1, ucnt, row0, first0, first1, S, qk_scale, 1, HEAD_DIM,
                           NUM_STAGES, PAD, NATURAL)),
        (_producer_union, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, Q_desc, K_desc, V_desc,
                           O, LSE, ROWMAP, o_off, o_s, BCNT, UIDX_row, IDX + off0, IDX + off1, POS + off0,
                           POS + off1, cnt0, cnt1, ucnt, row0, first0, first1, S, qk_scale, 0, HEAD_DIM,
                           NUM_STAGES, PAD, NATURAL)),
    ], [4, 1], [240, 24])


@triton.jit
def _union_lists_kernel(KEPT, PAIRS, UCNT, UIDX, POS, k_b, k_h, k_r, k_c, u_b, u_h, ui_b, ui_h, ui_r, p_b, p_h, p_r,
                        H, NK, BLOCK: tl.constexpr):
    """One program per pair of table rows (``PAIRS``; a second row ``-1`` is empty): the union of
    their kept blocks as an ascending list, and for each row's own list the position of each entry
    in that union."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inb = cols < NK
    r0 = tl.load(PAIRS + 2 * pid)
    r1 = tl.load(PAIRS + 2 * pid + 1)
    has1 = r1 >= 0
    r1 = tl.where(has1, r1, r0)
    base = KEPT + b * k_b + h * k_h
    a0 = tl.load(base + r0 * k_r + cols * k_c, mask=inb, other=0).to(tl.int32)
    a1 = tl.load(base + r1 * k_r + cols * k_c, mask=inb & has1, other=0).to(tl.int32)
    un = a0 | a1
    rank = tl.cumsum(un, 0) - 1
    tl.store(UCNT + b * u_b + h * u_h + pid, tl.sum(un, 0))
    tl.store(UIDX + b * ui_b + h * ui_h + pid * ui_r + rank, cols, mask=un > 0)
    pos = POS + b * p_b + h * p_h
    tl.store(pos + r0 * p_r + tl.cumsum(a0, 0) - 1, rank, mask=a0 > 0)
    tl.store(pos + r1 * p_r + tl.cumsum(a1, 0) - 1, rank, mask=a1 > 0)


def check_pairs(pairs: torch.Tensor, rows: int) -> None:
    """``pairs`` must be a contiguous int32 ``[ceil(rows / 2), 2]`` on the table's device (its values
    come from the layout: :meth:`nabla_attn.TokenLayout.table` ``"query_pairs"``)."""
    want = (-(-rows // 2), 2)
    if tuple(pairs.shape) != want or pairs.dtype != torch.int32 or not pairs.is_contiguous():
        raise ValueError(f"query pairs for a {rows}-row table must be contiguous int32 {want}, got "
                         f"{pairs.dtype} {tuple(pairs.shape)} (strides {pairs.stride()})")


def union_lists(kept: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a 64-row bool table ``[B|1, H|1, Qb, Kb]`` (any strides) and ``pairs`` of its rows
    (int32 ``[ceil(Qb/2), 2]``, every row in one pair, ``-1`` for a missing partner): union counts
    ``[B|1, H|1, ceil(Qb/2)]`` and ascending union lists ``[.., ceil(Qb/2), Kb]`` of each pair, and
    ``[B|1, H|1, Qb, Kb]`` positions of each row's kept blocks (in list order) within its pair's
    union; int32, entries past the counts unwritten."""
    from .attention import bh_strides

    t = kept.view(torch.uint8)
    B, H, nq, nk = t.shape
    check_pairs(pairs, nq)
    npair = pairs.shape[0]
    ucnt = torch.empty(B, H, npair, dtype=torch.int32, device=kept.device)
    uidx = torch.empty(B, H, npair, nk, dtype=torch.int32, device=kept.device)
    pos = torch.empty(B, H, nq, nk, dtype=torch.int32, device=kept.device)
    block = triton.next_power_of_2(nk)
    _union_lists_kernel[(npair, B * H)](
        t, pairs, ucnt, uidx, pos, *bh_strides(t), t.stride(2), t.stride(3), *bh_strides(ucnt), *bh_strides(uidx),
        uidx.stride(2), *bh_strides(pos), pos.stride(2), H, nk, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return ucnt, uidx, pos


# ------------------------------------------------------------------------------------------ launcher
@functools.cache
def gluon_validated() -> bool:
    """Whether this Triton is the release series the kernel was validated on (3.6)."""
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


def smem_bytes(stages: int, head_dim: int, element_size: int) -> int:
    """Shared memory of the kernel: two Q halves and ``stages`` K and V slots of 128 keys."""
    return (2 + 4 * stages) * BLOCK_TOKENS * head_dim * element_size


def _check_natural(out: torch.Tensor | None, rows: torch.Tensor | None, q: torch.Tensor) -> None:
    if (out is None) != (rows is None):
        raise ValueError("a natural-order output needs both out= and rows=")
    if out is None or rows is None:
        return
    B, H, S, D = q.shape
    if (out.dim() != 4 or tuple(out.shape[:2]) != (B, H) or out.shape[3] != D or out.stride(3) != 1
            or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"natural-order output {out.dtype} {tuple(out.shape)} (strides {out.stride()}) on "
                         f"{out.device} does not fit tiled q {q.dtype} {tuple(q.shape)} on {q.device}")
    if rows.shape != (S,) or rows.dtype != torch.int32 or not rows.is_contiguous():
        raise ValueError(f"row map must be contiguous int32 [{S}], got {rows.dtype} {tuple(rows.shape)}")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
            block_counts: torch.Tensor, scale: float, *, padded: bool, stages: int = 3,
            kept: torch.Tensor | None = None, pairs: torch.Tensor | None = None, out: torch.Tensor | None = None,
            rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and base-2 log-sum-exp of contiguous tiled fp16/bf16 q, k, v ``[B, H, S, D]`` (D 64 or
    128) under a table's kv lists; ``scale`` must be positive (it folds into exp2). A 128-row table
    passes its lists alone; a 64-row table also passes its bool table ``kept`` (the union lists are
    built from it) and the ``pairs`` of rows one program holds (:func:`union_lists`). ``stages``
    counts 128-key slots (a 64-row table's ring has twice as many one-block slots in the same
    shared memory). ``out``/``rows``: write the output in natural order into ``out`` instead
    (``[B, H, Sn, D]``, any strides with unit stride in D; ``rows``: int32 ``[S]``, each tiled row's
    natural row, ``-1`` for padding; returned in place of the tiled output), which saves the
    untiling pass of a forward-only call."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .attention import bh_strides

    B, H, S, D = q.shape
    need = smem_bytes(stages, D, q.element_size())
    if need > SMEM_BYTES:
        raise ValueError(f"the warp-specialised forward with {stages} stages needs {need // 1024} KiB of shared "
                         f"memory at head_dim {D}; Hopper has {SMEM_BYTES // 1024} KiB")
    if B * H * S >= 2**31:
        raise ValueError(f"the warp-specialised forward addresses rows with 32-bit copy-engine coordinates: batch x "
                         f"heads x tokens = {B} x {H} x {S} = {B * H * S} rows must stay below 2^31")
    _check_natural(out, rows, q)
    if kept is not None:
        # The kernel reads each own entry's union position with the kv lists' strides, and every
        # union position must be in one of the two lists (else no consumer waits for its V copy):
        # the lists must be the compaction of this very table.
        want = tuple(kept.shape)
        if tuple(indices.shape) != want or tuple(counts.shape) != want[:3] or not indices.is_contiguous():
            raise ValueError(f"the 64-row forward needs contiguous kv lists of its table {want}, got counts "
                             f"{tuple(counts.shape)} and indices {tuple(indices.shape)} (strides {indices.stride()})")
        if pairs is None:
            raise ValueError("the 64-row forward needs the pairs of query rows its programs hold (pairs=)")
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    rowmap = counts if rows is None else rows
    layout = gl.NVMMASharedLayout.get_default_for(
        [BLOCK_TOKENS, D], gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16)
    qd, kd, vd = (TensorDescriptor.from_tensor(x.view(B * H * S, D), [BLOCK_TOKENS, D], layout) for x in (q, k, v))
    if kept is not None:
        ucnt, uidx, pos = union_lists(kept, pairs)
        _attn_fwd_union[(pairs.shape[0], B * H)](
            qd, kd, vd, o, lse, rowmap, counts, indices, ucnt, uidx, pos, block_counts, pairs, *o.stride()[:3],
            *bh_strides(counts), *bh_strides(indices), indices.stride(2), *bh_strides(ucnt), *bh_strides(uidx),
            uidx.stride(2), H, S, scale * LOG2E, HEAD_DIM=D, NUM_STAGES=2 * stages, PAD=padded,
            NATURAL=out is not None, num_warps=4, maxnreg=168,
        )  # fmt: skip
        return o, lse
    _attn_fwd_ws[(-(-S // 128), B * H)](
        qd, kd, vd, o, lse, rowmap, counts, indices, block_counts, *o.stride()[:3], *bh_strides(counts),
        *bh_strides(indices), indices.stride(2), H, S, scale * LOG2E, HEAD_DIM=D, NUM_STAGES=stages, PAD=padded,
        NATURAL=out is not None,
        # 3 warpgroups (two 4-warp consumers, a 1-warp producer) at 168 registers; setmaxnreg then
        # moves them to 240 per consumer thread and 24 for the producer.
        num_warps=4, maxnreg=168,
    )  # fmt: skip
    return o, lse
