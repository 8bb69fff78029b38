"""Block tables: which (query block, key block) pairs attention computes.

A :class:`BlockSparseMask` is plain data: a bool table ``[batch, heads, query_blocks, key_blocks]``
over the blocks of a :class:`~nabla_attn.grid.TokenLayout`. Key blocks are always 64-token blocks;
query blocks hold ``query_block // 64`` consecutive 64-token blocks (1 or 2). Batch and head
dimensions may be 1 and then broadcast. Every backend computes exactly this table.

The eager functions here are the definition of NABLA's selection; faster builders must match them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .grid import BLOCK_TOKENS, TokenLayout, VideoGrid, block_counts_on, tile

QUERY_BLOCKS = (64, 128)


def _check_query_block(query_block: int) -> int:
    if query_block not in QUERY_BLOCKS:
        raise ValueError(f"query_block must be one of {QUERY_BLOCKS}, got {query_block!r}")
    return query_block


def check_threshold(threshold: float | None) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")


def check_sta_window(window: Sequence[int] | None) -> tuple[int, int, int] | None:
    if window is None:
        return None
    try:
        values = tuple(window)
    except TypeError:
        raise ValueError(f"sta_window must be three positive odd integers (wT, wH, wW), got {window!r}") from None
    if len(values) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0 for w in values):
        raise ValueError(f"sta_window must be three positive odd integers (wT, wH, wW), got {window!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class BlockSparseMask:
    """Which blocks attention computes.

    Attributes:
        kept: bool ``[batch or 1, heads or 1, query_blocks, key_blocks]``.
        layout: the token layout the blocks refer to.
        query_block: tokens per query block, 64 (the paper's granularity) or 128 (two consecutive
            tiles; see :func:`nabla_mask`).
    """

    kept: torch.Tensor
    layout: TokenLayout
    query_block: int = 64
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_query_block(self.query_block)
        if self.kept.dtype != torch.bool or self.kept.dim() != 4:
            raise ValueError(f"kept must be a 4-D bool tensor, got {self.kept.dtype} {tuple(self.kept.shape)}")
        expect = (self.num_query_blocks, self.layout.num_blocks)
        if tuple(self.kept.shape[2:]) != expect:
            raise ValueError(f"kept has block shape {tuple(self.kept.shape[2:])}, the layout needs {expect}")

    @property
    def num_query_blocks(self) -> int:
        group = self.query_block // BLOCK_TOKENS
        return -(-self.layout.num_blocks // group)

    def dense(self) -> torch.Tensor:
        """Bool ``[batch, heads, query_blocks, key_blocks]`` (video blocks first, then text blocks)."""
        return self.kept

    @property
    def density(self) -> float:
        """Kept fraction of block pairs (over all batch entries and heads)."""
        return float(self.kept.float().mean())

    def head_density(self) -> torch.Tensor:
        """Kept fraction of block pairs per batch entry and head, float32 ``[batch, heads]``."""
        return self.kept.float().mean(dim=(-2, -1))

    def expand(self, batch: int, heads: int) -> "BlockSparseMask":
        """The same mask with batch and head dimensions materialised."""
        b, h = self.kept.shape[:2]
        if (b not in (1, batch)) or (h not in (1, heads)):
            raise ValueError(f"mask of batch x heads {b}x{h} cannot serve {batch}x{heads}")
        if (b, h) == (batch, heads):
            return self
        return BlockSparseMask(self.kept.expand(batch, heads, -1, -1), self.layout, self.query_block)

    def union(self, other: "BlockSparseMask") -> "BlockSparseMask":
        if other.layout != self.layout or other.query_block != self.query_block:
            raise ValueError("union needs masks of the same layout and query_block")
        return BlockSparseMask(self.kept | other.kept, self.layout, self.query_block)

    def kv_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block, the kept key blocks: ``(counts int32 [B,H,Qb], indices int32 [B,H,Qb,Kb])``.

        Indices are ascending and packed at the front; entries past the count are unspecified.
        """
        if "kv" not in self._cache:
            self._cache["kv"] = compact_rows(self.kept)
        return self._cache["kv"]


def compact_rows(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row compaction of a bool table without sorting: counts and ascending column lists (int32)."""
    counts = kept.sum(-1, dtype=torch.int32)
    n = kept.shape[-1]
    pos_kept = kept.cumsum(-1, dtype=torch.int32) - 1
    pos_dropped = counts.unsqueeze(-1) + (~kept).cumsum(-1, dtype=torch.int32) - 1
    pos = torch.where(kept, pos_kept, pos_dropped).long()
    cols = torch.arange(n, device=kept.device, dtype=torch.int32).expand_as(pos)
    idx = torch.empty_like(cols).scatter_(-1, pos, cols)
    return counts, idx


def pool_blocks(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean of each block's real tokens, float32 ``[B, H, num_blocks, D]`` from tiled ``[B, H, tiled_len, D]``."""
    B, H, _, D = x.shape
    sums = x.float().view(B, H, layout.num_blocks, BLOCK_TOKENS, D).sum(-2)
    counts = block_counts_on(layout, x.device).to(torch.float32)
    return sums / counts.view(1, 1, -1, 1)


def cdf_keep(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """NABLA's CDF cut on the last axis of ``probs`` (rows summing to 1).

    A key block is kept when the total probability of the blocks whose probability is <= its own
    reaches ``1 - threshold``: sort ascending, take the running sum, keep entries whose running sum
    is >= ``1 - threshold``. Equal probabilities are kept or dropped together, so the result does
    not depend on a sort's order for ties. Rows that are not finite keep every block, so NaN in q or k
    reaches the output instead of hiding behind a plausible mask.
    """
    sorted_p, order = torch.sort(probs, dim=-1)
    running = sorted_p.cumsum(-1)
    last_tie = torch.searchsorted(sorted_p.contiguous(), sorted_p.contiguous(), right=True) - 1
    keep_sorted = running.gather(-1, last_tie) >= (1.0 - float(threshold))
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    finite = torch.isfinite(probs).all(-1, keepdim=True)
    return keep | ~finite


def _group_rows(kept64: torch.Tensor, query_block: int) -> torch.Tensor:
    """Union of consecutive 64-token query rows into ``query_block`` rows."""
    group = query_block // BLOCK_TOKENS
    if group == 1:
        return kept64
    B, H, Q, K = kept64.shape
    pad = (-Q) % group
    if pad:
        kept64 = torch.cat([kept64, kept64.new_zeros(B, H, pad, K)], dim=2)
    return kept64.view(B, H, -1, group, K).any(dim=3)


def _sta_video(grid: VideoGrid, window: tuple[int, int, int], device: torch.device | str | None) -> torch.Tensor:
    T, R, C = grid.block_grid
    t = torch.arange(T, device=device).repeat_interleave(R * C)
    r = torch.arange(R, device=device).repeat_interleave(C).repeat(T)
    c = torch.arange(C, device=device).repeat(T * R)
    wt, wr, wc = (w // 2 for w in window)
    return (
        ((t[:, None] - t[None, :]).abs() <= wt)
        & ((r[:, None] - r[None, :]).abs() <= wr)
        & ((c[:, None] - c[None, :]).abs() <= wc)
    )


def _with_text(video: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Embed a video-block table ``[..., Nv, Nv]`` in the full table; text rows and columns all kept."""
    nv, nb = layout.num_video_blocks, layout.num_blocks
    if nb == nv:
        return video
    full = video.new_ones(*video.shape[:-2], nb, nb)
    full[..., :nv, :nv] = video
    return full


def sta_mask(
    grid: VideoGrid,
    window: Sequence[int],
    text_tokens: int = 0,
    text_position: str = "end",
    *,
    query_block: int = 64,
    device: torch.device | str | None = None,
) -> BlockSparseMask:
    """Sliding Tile Attention on the block grid: block pairs with ``|dt| <= wT//2``, ``|dh| <= wH//2``,
    ``|dw| <= wW//2`` (in blocks, cut at the borders). Shape ``[1, 1, Qb, Kb]``; text blocks all kept."""
    win = check_sta_window(window)
    if win is None:
        raise ValueError("sta_mask needs a window (wT, wH, wW)")
    layout = TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]
    kept = _with_text(_sta_video(grid, win, device), layout)[None, None]
    return BlockSparseMask(_group_rows(kept, _check_query_block(query_block)), layout, query_block)


def _fast_builder() -> "Callable[..., BlockSparseMask] | None":
    """The fused Triton builder (``kernels/mask_build.py``) where Triton imports, else None."""
    try:
        from .kernels.mask_build import build_nabla_mask_fast
    except ImportError:
        return None
    return build_nabla_mask_fast


def check_mask_args(
    threshold: float | None, sta_window: Sequence[int] | None, query_block: int
) -> tuple[int, int, int] | None:
    """Validate a mask request (every builder's arguments); returns the STA window as a tuple."""
    check_threshold(threshold)
    win = check_sta_window(sta_window)
    _check_query_block(query_block)
    if threshold is None and win is None:
        raise ValueError("nabla_mask needs a threshold, an sta_window, or both")
    return win


def nabla_mask_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    *,
    query_block: int = 64,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockSparseMask:
    """:func:`nabla_mask` on q, k already in tiled layout (``[B, H, layout.tiled_len, D]``).

    ``means``: q's and k's block means from :func:`nabla_attn.grid.tile_pooled` (CUDA), which the
    fused builder then uses instead of pooling again; elsewhere the builder pools by itself.
    """
    win = check_mask_args(threshold, sta_window, query_block)
    # --- fast path (issue 3): on CUDA the fused Triton builder computes this same table. ---
    if q.is_cuda and (fast := _fast_builder()) is not None:
        return fast(q, k, layout, threshold, win, query_block=query_block, means=means)
    # --- end fast path ---
    nv = layout.num_video_blocks
    with torch.no_grad():
        if threshold is None:
            B, H = 1, 1
            video = torch.zeros(B, H, nv, nv, dtype=torch.bool, device=q.device)
        else:
            qa = pool_blocks(q, layout)[:, :, :nv]
            ka = pool_blocks(k, layout)[:, :, :nv]
            scores = qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1])
            video = cdf_keep(torch.softmax(scores, dim=-1), threshold)
        if win is not None:
            video = video | _sta_video(layout.grid, win, q.device)
        kept = _group_rows(_with_text(video, layout), query_block)
    return BlockSparseMask(kept, layout, query_block)


def nabla_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: VideoGrid,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    text_tokens: int = 0,
    text_position: str = "end",
    *,
    query_block: int = 64,
) -> BlockSparseMask:
    """NABLA's block table (Algorithm 1 of arXiv 2507.13546) for q, k ``[B, H, S, D]`` in natural order.

    Per batch entry and head: mean-pool q and k over each video block (float32, real tokens only),
    ``P = softmax(qa @ ka^T / sqrt(D))`` over video key blocks, and keep per query block the key
    blocks selected by :func:`cdf_keep`. ``sta_window=(wT, wH, wW)`` adds the STA window; with
    ``threshold=None`` the mask is STA alone. Text query blocks keep every block and every query keeps
    the text key blocks. ``query_block=128`` groups two consecutive tiles into one query block that
    keeps the union of their key blocks (a superset of the 64-token mask, so it never drops a block
    the paper's mask keeps).
    """
    from .attention import check_qkv, make_layout  # local: attention imports this module

    layout = make_layout(grid, text_tokens, text_position)
    check_qkv(q, k, k, layout, "natural")
    return nabla_mask_tiled(tile(q, layout), tile(k, layout), layout, threshold, sta_window, query_block=query_block)
