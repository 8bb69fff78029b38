"""NABLA attention under Ulysses sequence parallelism.

Each rank of a ``torch.distributed`` group holds a contiguous shard of the natural-order sequence
(see :mod:`nabla_attn.distributed.partition`). One call:

1. *Block means.* Each rank sums q and k over the video tokens of its shard into per-block float32
   sums ``[B, H, video_blocks, D]`` (a block cut by a shard boundary gets a partial sum on each
   side) and one all-reduce adds them up, so every rank holds every head's block means of the full
   sequence. This moves ``2 * B * H * blocks * D`` floats, about 43 MB for Wan 14B at 720p.
2. *Masks and head assignment.* Without balancing (``balance=False``) steps 1 and 2 are skipped:
   each rank builds the tables of its own contiguous run of heads after step 3, from the tiled q, k
   it received (:func:`nabla_attn.nabla_mask_tiled`, the single-GPU builder), so its mask costs
   what one process's does for that many heads. With balancing each rank builds the tables of one
   run from the means (:func:`nabla_attn.mask_from_means`), the tables are
   all-gathered (bool, ``H * Qb * Kb`` bytes), every rank counts each head's kept blocks and runs the
   same greedy longest-processing-time assignment (fixed head count per rank), so all ranks agree.
3. *All-to-all in.* q, k, v travel in one differentiable node, one ``all_to_all_single`` each: each
   rank receives the full sequence for its heads, lands it directly in the tiled layout.
4. *Attention.* The core :func:`~nabla_attn.nabla_attention` with the precomputed mask,
   ``token_order="tiled"``.
5. *All-to-all out.* The outputs go back to sequence shards in the original head order.

The all-to-alls are autograd functions, so gradients flow to the local q, k, v shards.

Mask equality with one process: without balancing, each table is built as one process builds it
from tiled q, k. With balancing, the tables are computed from the same float32 block means as
:func:`~nabla_attn.nabla_mask`, except that the sums are accumulated in a different order (token
order per rank, then across ranks, instead of per 64-slot block). The means therefore agree to
float32 rounding (relative ~1e-7), and a table can differ from the single-process one only where a
block's cumulative probability lies within that rounding of ``1 - threshold``. The tests check exact
table equality on their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention import BACKENDS, Backend, make_layout, mask_from_means, nabla_attention, nabla_mask_tiled
from ..cache import DeviceCache
from ..constants import TILE
from ..grid import TokenLayout, VideoGrid
from ..masks import BlockSparseMask, MaskSpec, num_query_blocks, sta_mask
from ..validation import as_choice, check_tensors
from .comm import ProcessGroup, all_to_all_rows, group_size_rank
from .maps import gathers
from .partition import balance_heads, check_shard_sizes, contiguous_heads, even_head_counts, rank_loads, shard_sizes as default_sizes
from .timing import PhaseTimer


@dataclass(frozen=True)
class UlyssesInfo:
    """What one call decided (returned with ``return_info=True``).

    Attributes:
        assignment: heads per rank (``assignment[p]`` ascending); identical on every rank.
        head_costs: kept (query block, key block) pairs per head summed over the batch, when they were
            computed (balancing with a computed or given per-head mask), else None.
        local_heads: this rank's heads (``assignment[rank]``).
        mask: the block table used for ``local_heads`` (heads dimension 1 when shared by every head).
        shard_sizes: tokens per rank of the natural sequence.
    """

    assignment: list[list[int]]
    head_costs: list[int] | None
    local_heads: list[int]
    mask: BlockSparseMask
    shard_sizes: list[int]

    def rank_costs(self) -> list[int] | None:
        """Kept block pairs per rank under ``assignment`` (None when costs were not computed)."""
        if self.head_costs is None:
            return None
        return [sum(self.head_costs[h] for h in heads) for heads in self.assignment]


def _video_range(layout: TokenLayout) -> tuple[int, int]:
    start = layout.text_tokens if layout.text_position == "start" else 0
    return start, start + layout.grid.num_tokens


def _block_means(
    q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, offset: int, n: int, group: ProcessGroup | None
) -> torch.Tensor:
    """Float32 ``[2, B, H, video_blocks, D]`` block means of q and k over the full sequence.

    A contiguous shard of the frame-major video tokens is a run of grid rows (a partial first and
    last row are padded with zeros), so each rank sums every row's 8-token tile segments with one
    strided reduction that accumulates in float32 without a float32 copy of q or k, then adds the
    row sums into their block rows (``index_add_`` over at most a few hundred rows). One all-reduce
    completes the sums of blocks cut by shard boundaries.
    """
    B, H, _, D = q.shape
    g = layout.grid
    R, C = g.tile_rows, g.tile_cols
    nv = layout.num_video_blocks
    sums = torch.zeros(2, B, H, g.frames * R, C, D, dtype=torch.float32, device=q.device)
    # Text tokens sit at one end, so the video tokens of a contiguous shard are one contiguous range.
    v0, v1 = _video_range(layout)
    a, b = max(offset, v0), min(offset + n, v1)
    if b > a:
        va, vb = a - v0, b - v0  # video-local token range
        row0, row1 = va // g.width, -(-vb // g.width)
        front, back = va - row0 * g.width, row1 * g.width - vb
        band = _BANDS.get((layout, row0, row1), q.device, lambda: _band_ids(layout, row0, row1).to(q.device))
        for i, x in enumerate((q, k)):
            part = x[:, :, a - offset : b - offset]
            if front or back:
                part = F.pad(part, (0, 0, front, back))
            rows = part.unflatten(2, (row1 - row0, g.width))  # [B, H, rows, W, D] (a view)
            if g.width % TILE:
                rows = F.pad(rows, (0, 0, 0, C * TILE - g.width))
            tile_sums = rows.unflatten(3, (C, TILE)).sum(4, dtype=torch.float32)  # [B, H, rows, C, D]
            sums[i].index_add_(2, band, tile_sums)
    sums = sums.view(2, B, H, nv, D)
    dist.all_reduce(sums, group=group)
    counts = layout.block_counts(q.device)[:nv].to(torch.float32)
    return sums / counts.view(1, 1, 1, -1, 1)


_BANDS: DeviceCache[torch.Tensor] = DeviceCache(64)


def _band_ids(layout: TokenLayout, row0: int, row1: int) -> torch.Tensor:
    """Block row ``t * tile_rows + h // 8`` of grid rows ``row0 .. row1-1`` (rows counted over all frames)."""
    rows = torch.arange(row0, row1)
    t, h = rows // layout.grid.height, rows % layout.grid.height
    return t * layout.grid.tile_rows + h // TILE


def _pick_assignment(costs: list[int], world: int, min_gain: float) -> list[list[int]]:
    """The balanced assignment if it lowers the busiest rank's cost by ``min_gain`` or more, else the plain one."""
    plain = contiguous_heads(len(costs), world)
    balanced = balance_heads(costs, world)
    plain_max = max(rank_loads(plain, costs))
    gain = 1.0 - max(rank_loads(balanced, costs)) / plain_max if plain_max > 0 else 0.0
    return balanced if gain >= min_gain and gain > 0 else plain


def _all_gather_costs(kept: torch.Tensor, counts: Sequence[int], group: ProcessGroup | None) -> list[int]:
    """Kept block pairs per head (summed over the batch) of every rank's head run, in head order."""
    P, hmax = len(counts), max(counts)
    mine = kept.sum(dim=(0, 2, 3), dtype=torch.int64)
    if mine.numel() < hmax:
        mine = torch.cat([mine, mine.new_zeros(hmax - mine.numel())])
    recv = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(recv, mine, group=group)
    return [int(x) for x in torch.cat([recv[p][: counts[p]] for p in range(P)]).tolist()]


def _all_gather_heads(kept: torch.Tensor, counts: Sequence[int], group: ProcessGroup | None) -> torch.Tensor:
    """All-gather per-rank head runs of a bool table ``[B, h_p, Qb, Kb]`` into ``[B, H, Qb, Kb]``."""
    P = len(counts)
    hmax = max(counts)
    B, h, Qb, Kb = kept.shape
    # uint8, heads first, padded to the longest run: all_gather needs equal shapes on every rank.
    send = kept.transpose(0, 1).to(torch.uint8)
    if h < hmax:
        send = torch.cat([send, send.new_zeros(hmax - h, B, Qb, Kb)])
    recv = [torch.empty_like(send) for _ in range(P)]
    dist.all_gather(recv, send.contiguous(), group=group)
    full = torch.cat([recv[p][: counts[p]] for p in range(P)])
    return full.transpose(0, 1).bool()


# ----------------------------------------------------------------------------------------------
# The op


def ulysses_nabla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: VideoGrid,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    text_tokens: int = 0,
    text_position: str = "end",
    *,
    group: ProcessGroup | None = None,
    balance: bool = False,
    balance_min_gain: float = 0.1,
    backend: Backend = "auto",
    query_block: int = 64,
    scale: float | None = None,
    mask: BlockSparseMask | None = None,
    shard_sizes: Sequence[int] | None = None,
    return_info: bool = False,
    timer: PhaseTimer | None = None,
) -> torch.Tensor | tuple[torch.Tensor, UlyssesInfo]:
    """NABLA attention over a sequence sharded across the ranks of ``group`` (Ulysses).

    Args:
        q, k, v: this rank's shard ``[batch, heads, local_seq, head_dim]`` of the natural-order
            sequence (frame-major video tokens, ``text_tokens`` text tokens at ``text_position``),
            all heads. Rank ``p`` holds tokens ``[sum(sizes[:p]), sum(sizes[:p+1]))`` where ``sizes``
            is ``shard_sizes`` or, by default, ``torch.tensor_split``'s split of the sequence (the
            first ``seq_len % world`` ranks one token longer; the split diffusers uses).
            ``local_seq`` is either ``sizes[rank]`` or, for callers that pad every shard to one
            length, ``max(sizes)``: the tail past ``sizes[rank]`` is padding, never read, and its
            output rows are zero.
        grid, threshold, sta_window, text_tokens, text_position, backend, query_block, scale: as in
            :func:`nabla_attn.nabla_attention` (the same on every rank).
        group: the Ulysses process group (default: the default group). Any backend: NCCL on GPUs,
            gloo on CPU.
        balance: assign heads to ranks by their kept-block counts (same number of heads per rank,
            greedy longest-processing-time) instead of contiguous runs, when that lowers the busiest
            rank's kept blocks by at least ``balance_min_gain`` (a fraction). Off by default: it
            needs every head's table before the all-to-all (from all-reduced block means), which
            costs more than the contiguous split's tables built after it (docs/distributed.md has
            the measurements); turn it on when heads' densities differ widely. Moving heads costs
            copies and a table all-gather (~2 ms per Wan 14B 720p block on 2 H200s, measured), so
            a near-even contiguous split is kept as is.
        balance_min_gain: see ``balance``; 0 balances whenever the assignment differs.
        mask: a precomputed :class:`BlockSparseMask` for the *whole* sequence and all heads (or
            heads dimension 1), the same on every rank; then no masks are computed.
        shard_sizes: tokens per rank (see above); must be the same on every rank.
        return_info: also return a :class:`UlyssesInfo` (assignment, costs, the local mask).
        timer: a :class:`PhaseTimer` that records the phases ``mask``, ``all_to_all`` and ``attention``.

    Returns:
        The output shard shaped like ``v`` (``[batch, heads, local_seq, v_head_dim]``, v's dtype; may
        be a non-contiguous view), and the info if ``return_info``.

    Heads need not divide by the world size: ranks get ``heads // world`` or one more (a rank may get
    none when heads < world). Every rank must call with the same arguments except the tensors.
    """
    P, rank = group_size_rank(group)
    layout = make_layout(grid, text_tokens, text_position)
    check_tensors(q, k, v, "local_seq")
    S = layout.seq_len
    sizes = check_shard_sizes(shard_sizes, S, P) if shard_sizes is not None else default_sizes(S, P)
    n_r, c = sizes[rank], max(sizes)
    offset = sum(sizes[:rank])
    L = q.shape[2]
    if L not in (n_r, c):
        raise ValueError(
            f"rank {rank}: local sequence length {L} does not match its shard: the {S}-token sequence "
            f"({grid.frames}x{grid.height}x{grid.width} video + {text_tokens} text) split over {P} ranks as "
            f"{sizes} gives this rank {n_r} tokens (or {c} when every shard is padded to the longest)"
        )
    # Argument errors are raised before the first collective, so a bad call fails on every rank
    # instead of leaving the others waiting.
    as_choice("backend", backend, BACKENDS)
    spec = MaskSpec(threshold, sta_window, query_block) if mask is None else None
    if mask is not None and mask.layout != layout:
        raise ValueError(f"mask was built for {mask.layout}, not {layout}")
    B, H, _, D = q.shape
    Dv = v.shape[-1]
    if mask is not None:
        b, h = mask.kept.shape[:2]
        if b not in (1, B) or h not in (1, H):
            raise ValueError(f"mask of batch x heads {b}x{h} cannot serve {B}x{H}")
        query_block = mask.query_block
    else:
        query_block = spec.query_block  # type: ignore[union-attr]

    # ---- masks and head assignment -----------------------------------------------------------
    if timer is not None:
        timer.start("mask")
    head_costs: list[int] | None = None
    counts = even_head_counts(H, P)
    with torch.no_grad():
        if mask is not None:
            kept_all = mask.kept.to(q.device)
            assignment = contiguous_heads(H, P)
            if balance and kept_all.shape[1] == H:
                head_costs = [int(x) for x in kept_all.sum(dim=(0, 2, 3), dtype=torch.int64).tolist()]
                assignment = _pick_assignment(head_costs, P, balance_min_gain)
            local = assignment[rank]
            kept_local = kept_all[:, local] if kept_all.shape[1] == H else kept_all
        elif spec.threshold is None:  # type: ignore[union-attr]
            # Pure STA: one table for every head, so every head costs the same; nothing to balance.
            assignment = contiguous_heads(H, P)
            kept_local = sta_mask(grid, spec.sta_window, text_tokens, text_position,  # type: ignore[union-attr, arg-type]
                                  query_block=query_block, device=q.device).kept
        elif not balance:
            # Plain split: the rank's own heads arrive whole with the all-to-all, and their table is
            # built there from the tiled q, k (below), like one process's: its cost shrinks with
            # the heads a rank holds, and no block sums cross ranks.
            assignment, kept_local = contiguous_heads(H, P), None
        else:
            means = _block_means(q, k, layout, offset, n_r, group)
            plain = contiguous_heads(H, P)
            run = plain[rank]
            kept_run = mask_from_means(means[0][:, run], means[1][:, run], layout, spec, backend).kept  # type: ignore[arg-type]
            assignment, kept_local = plain, kept_run
            if balance:
                # Costs first (H integers): the tables move only if balancing is worth its copies.
                head_costs = _all_gather_costs(kept_run, counts, group)
                assignment = _pick_assignment(head_costs, P, balance_min_gain)
                if assignment != plain:
                    kept_local = _all_gather_heads(kept_run, counts, group)[:, assignment[rank]]
    local_heads = assignment[rank]

    # ---- all-to-all: sequence shards -> full sequence for own heads, in tiled order -------------
    # Copies are the cost here (a full-sequence q, k, v for a rank's heads is ~1 GB at Wan 14B
    # 720p on 2 GPUs), so each tensor makes one all-to-all with no send-side copy when the heads
    # keep their order and batch is 1, and lands in tiled order through one gather.
    if timer is not None:
        timer.start("all_to_all")
    perm = [h for heads in assignment for h in heads]
    perm_idx = None if perm == list(range(H)) else torch.tensor(perm, device=q.device)
    h_r = len(local_heads)
    send_rows = [len(a) for a in assignment]
    gather_in, gather_out, slot_valid, seg_in, seg_out = gathers(layout, tuple(sizes), h_r, B, q.device)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # Own valid tokens, padded to c slots, heads grouped by destination rank; rows = heads.
        x = x[:, :, :n_r]
        if n_r < c:
            x = F.pad(x, (0, 0, 0, c - n_r))
        if perm_idx is not None:
            x = x.index_select(1, perm_idx)
        return x.transpose(0, 1)

    recv = all_to_all_rows([heads_first(x) for x in (q, k, v)], send_rows, [h_r] * P, group, zero_rows=1)
    # Each received buffer: [P*h_r + 1, B, c, d] by (source rank, head), then a zero slab that the
    # gather reads for the tiled layout's padding slots.
    qt, kt, vt = (
        r.view(-1, seg_in * r.shape[-1]).index_select(0, gather_in).view(B, h_r, layout.tiled_len, r.shape[-1])
        for r in recv
    )

    if kept_local is None:
        if timer is not None:
            timer.start("mask")
        if h_r > 0:
            kept_local = nabla_mask_tiled(qt.detach(), kt.detach(), layout, spec.threshold, spec.sta_window,  # type: ignore[union-attr]
                                          query_block=query_block, backend=backend).kept
        else:
            kept_local = torch.zeros(B, 0, num_query_blocks(layout, query_block), layout.num_blocks,
                                     dtype=torch.bool, device=q.device)
    local_mask = BlockSparseMask(kept_local.contiguous(), layout, query_block)

    # ---- attention over the full sequence for own heads ------------------------------------------
    if timer is not None:
        timer.start("attention")
    if h_r > 0:
        out_t = nabla_attention(
            qt, kt, vt, grid, None, None, text_tokens, text_position,
            mask=local_mask, backend=backend, token_order="tiled", scale=scale,
        )  # fmt: skip
    else:
        out_t = vt  # [B, 0, tiled_len, Dv]: nothing to attend (the all-to-all node stays in the graph)

    # ---- all-to-all back: own heads over the full sequence -> all heads over own shard -----------
    if timer is not None:
        timer.start("all_to_all")
    # One gather puts the output rows in send order [P, h_r, B, c] (chunk padding slots read row 0:
    # the receiver drops or zeroes them).
    o = out_t.reshape(-1, seg_out * Dv).index_select(0, gather_out).view(P * h_r, B, c, Dv)
    (back,) = all_to_all_rows([o], [h_r] * P, send_rows, group)  # [H in perm order, B, c, Dv]
    if perm_idx is not None:
        inverse = torch.empty_like(perm_idx)
        inverse[perm_idx] = torch.arange(H, device=q.device)
        back = back.index_select(0, inverse)
    out = back.transpose(0, 1)[:, :, :L]
    if L > n_r:  # padded shard: its padding rows are zeros (and pass no gradient)
        out = out.masked_fill(~slot_valid[rank, :L].view(1, 1, L, 1), 0.0)
    if timer is not None:
        timer.stop()
    if return_info:
        return out, UlyssesInfo(assignment, head_costs, local_heads, local_mask, sizes)
    return out
