"""Block tables: which (query block, key block) pairs attention computes, and NABLA's definition.

A :class:`BlockSparseMask` is plain data: a bool table ``[batch, heads, query_blocks, key_blocks]``
over the blocks of a :class:`~nabla_attn.grid.TokenLayout`. Key blocks are always 64-token blocks;
query blocks hold ``query_block // 64`` consecutive 64-token blocks (1 or 2). Batch and head
dimensions may be 1 and then broadcast. Every backend computes exactly this table.

The eager functions here are the definition of NABLA's selection (Algorithm 1 of arXiv
2507.13546), on every device; faster builders in the backends must match them:

1. :func:`pool_blocks`: mean of q and k over each block's real tokens (float32);
2. block scores ``qa @ ka^T / sqrt(D)`` and their softmax over video key blocks;
3. :func:`cdf_keep`: per row, keep the key blocks holding a ``threshold`` share of the mass;
4. :func:`sta_table`: the STA window, ORed in; text rows and columns kept (:func:`with_text`);
5. :func:`group_rows`: 128-token query blocks keep the union of their two 64-token rows.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .constants import BLOCK_TOKENS, QUERY_BLOCKS
from .grid import TokenLayout, VideoGrid


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), in plain Python arithmetic, so that it
    is a constant under ``torch.compile`` (normal numbers and 0; the cut is never subnormal)."""
    if x == 0.0 or not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 2**24), exponent - 24)


def _window(window: object) -> tuple[int, int, int] | None:
    if window is None:
        return None
    message = f"sta_window must be three positive odd integers (wT, wH, wW), got {window!r}"
    if isinstance(window, (str, bytes)):
        raise ValueError(message)
    try:
        values = tuple(window)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(message) from None
    if len(values) != 3 or any(
        isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 or w % 2 == 0 for w in values
    ):
        raise ValueError(message)
    return tuple(int(w) for w in values)  # type: ignore[return-value]


def _threshold(threshold: object) -> float | None:
    if threshold is None:
        return None
    ok = not isinstance(threshold, bool) and isinstance(threshold, numbers.Real)
    if not ok or not (0.0 < float(threshold) <= 1.0):  # NaN fails the comparison
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


@dataclass(frozen=True)
class MaskSpec:
    """What to keep: NABLA's ``threshold`` (kept softmax mass in (0, 1]; None: no NABLA part), an STA
    ``sta_window`` ``(wT, wH, wW)`` (positive odd, in blocks; None: no STA part), and the
    ``query_block`` (64 or 128 tokens). Validated once here; numpy numbers are accepted."""

    threshold: float | None = 0.7
    sta_window: tuple[int, int, int] | None = None
    query_block: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _threshold(self.threshold))
        object.__setattr__(self, "sta_window", _window(self.sta_window))
        qb = self.query_block
        if isinstance(qb, bool) or not isinstance(qb, numbers.Integral) or int(qb) not in QUERY_BLOCKS:
            raise ValueError(f"query_block must be one of {QUERY_BLOCKS}, got {qb!r}")
        object.__setattr__(self, "query_block", int(qb))
        if self.threshold is None and self.sta_window is None:
            raise ValueError("a mask needs a threshold, an sta_window, or both (got neither)")

    @property
    def cut(self) -> float | None:
        """``1 - threshold`` rounded to float32, as every builder compares running sums with it."""
        return None if self.threshold is None else float32(1.0 - self.threshold)

    @property
    def half_window(self) -> tuple[int, int, int] | None:
        """The STA window as the largest kept distance per axis, ``(wT//2, wH//2, wW//2)``."""
        return None if self.sta_window is None else tuple(w // 2 for w in self.sta_window)  # type: ignore[return-value]

    @property
    def group(self) -> int:
        """64-token rows per query block (1 or 2)."""
        return self.query_block // BLOCK_TOKENS


def num_query_blocks(layout: TokenLayout, query_block: int) -> int:
    return -(-layout.num_blocks // (query_block // BLOCK_TOKENS))


@dataclass(frozen=True, eq=False)
class BlockSparseMask:
    """Which blocks attention computes.

    Attributes:
        kept: bool ``[batch or 1, heads or 1, query_blocks, key_blocks]``.
        layout: the token layout the blocks refer to.
        query_block: tokens per query block, 64 (the paper's granularity) or 128 (two consecutive
            tiles; see :func:`nabla_attn.nabla_mask`).

    Plain data: backends derive whatever lists they need from ``kept`` on every use, so editing
    ``kept`` in place is always seen.
    """

    kept: torch.Tensor
    layout: TokenLayout
    query_block: int = 64

    def __post_init__(self) -> None:
        if self.query_block not in QUERY_BLOCKS:
            raise ValueError(f"query_block must be one of {QUERY_BLOCKS}, got {self.query_block!r}")
        if not isinstance(self.kept, torch.Tensor) or self.kept.dtype != torch.bool or self.kept.dim() != 4:
            got = f"{self.kept.dtype} {tuple(self.kept.shape)}" if isinstance(self.kept, torch.Tensor) else type(self.kept).__name__
            raise ValueError(f"kept must be a 4-D bool tensor, got {got}")
        expect = (self.num_query_blocks, self.layout.num_blocks)
        if tuple(self.kept.shape[2:]) != expect:
            raise ValueError(f"kept has block shape {tuple(self.kept.shape[2:])}, the layout needs {expect}")

    @property
    def num_query_blocks(self) -> int:
        return num_query_blocks(self.layout, self.query_block)

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
        return compact_rows(self.kept)


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


# ------------------------------------------------------------------------------- the definition
def pool_blocks(x: torch.Tensor, layout: TokenLayout, n: int | None = None) -> torch.Tensor:
    """Mean of the real tokens of the first ``n`` blocks (default all), float32 ``[B, H, n, D]``, from
    tiled ``[B, H, tiled_len, D]`` (padding slots are zeros). Accumulates in float32 without a
    float32 copy of ``x``."""
    B, H, _, D = x.shape
    n = layout.num_blocks if n is None else n
    sums = x[:, :, : n * BLOCK_TOKENS].reshape(B, H, n, BLOCK_TOKENS, D).sum(-2, dtype=torch.float32)
    counts = layout.block_counts(x.device)[:n].to(torch.float32)
    return sums / counts.view(1, 1, -1, 1)


def cdf_keep(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """NABLA's CDF cut on the last axis of ``probs`` (rows summing to 1).

    A key block is kept when the total probability of the blocks whose probability is <= its own
    reaches ``1 - threshold`` (compared in float32): sort ascending, take the running sum, keep
    entries whose running sum is >= ``1 - threshold``. Equal probabilities are kept or dropped
    together, so the result does not depend on a sort's order for ties. A row's largest block (and
    its ties) is always kept, as exact arithmetic would: float32 sums can fall short of a cut that
    rounds to 1 for thresholds near 0. Rows that are not finite keep every block, so NaN in q or k
    reaches the output instead of hiding behind a plausible mask.
    """
    sorted_p, order = torch.sort(probs, dim=-1)
    running = sorted_p.cumsum(-1)
    last_tie = torch.searchsorted(sorted_p.contiguous(), sorted_p.contiguous(), right=True) - 1
    # (A Python float against a float32 tensor compares in float32.)
    keep_sorted = (running.gather(-1, last_tie) >= 1.0 - float(threshold)) | (sorted_p == sorted_p[..., -1:])
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    finite = torch.isfinite(probs).all(-1, keepdim=True)
    return keep | ~finite


def sta_table(grid: VideoGrid, window: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Sliding Tile Attention over video blocks: bool ``[Nv, Nv]`` keeping pairs with
    ``|dt| <= wT//2``, ``|dh| <= wH//2``, ``|dw| <= wW//2`` (in blocks, cut at the borders)."""
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


def with_text(video: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Embed a video-block table ``[..., Nv, Nv]`` in the full table; text rows and columns all kept."""
    nv, nb = layout.num_video_blocks, layout.num_blocks
    if nb == nv:
        return video
    full = video.new_ones(*video.shape[:-2], nb, nb)
    full[..., :nv, :nv] = video
    return full


def group_rows(kept64: torch.Tensor, query_block: int) -> torch.Tensor:
    """Union of consecutive 64-token query rows into ``query_block`` rows."""
    group = query_block // BLOCK_TOKENS
    if group == 1:
        return kept64
    B, H, Q, K = kept64.shape
    pad = (-Q) % group
    if pad:
        kept64 = torch.cat([kept64, kept64.new_zeros(B, H, pad, K)], dim=2)
    return kept64.view(B, H, -1, group, K).any(dim=3)


def mask_from_means(qa: torch.Tensor | None, ka: torch.Tensor | None, layout: TokenLayout,
                    spec: MaskSpec, device: torch.device | str | None = None) -> BlockSparseMask:
    """NABLA's table from float32 video-block means ``[B, H, num_video_blocks, D]`` of q and k (steps
    2-5 above). For STA alone the means are not needed (None) and the table is built on ``device``
    with batch and heads 1. Eager, no gradient."""
    nv = layout.num_video_blocks
    with torch.no_grad():
        if spec.threshold is None:
            video = torch.zeros(1, 1, nv, nv, dtype=torch.bool, device=device)
        else:
            if qa is None or ka is None:
                raise ValueError("a threshold needs the block means of q and k")
            scores = qa @ ka.transpose(-1, -2) / math.sqrt(qa.shape[-1])
            video = cdf_keep(torch.softmax(scores, dim=-1), spec.threshold)
        if spec.sta_window is not None:
            video = video | sta_table(layout.grid, spec.sta_window, video.device)
        kept = group_rows(with_text(video, layout), spec.query_block)
    return BlockSparseMask(kept, layout, spec.query_block)


def reference_mask(qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, spec: MaskSpec) -> BlockSparseMask:
    """NABLA's table for q, k ``[B, H, tiled_len, D]`` in tiled order: the whole definition, eager."""
    if spec.threshold is None:
        return mask_from_means(None, None, layout, spec, qt.device)
    nv = layout.num_video_blocks
    with torch.no_grad():
        qa, ka = pool_blocks(qt, layout, nv), pool_blocks(kt, layout, nv)
    return mask_from_means(qa, ka, layout, spec)


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
    if window is None:
        raise ValueError("sta_mask needs a window (wT, wH, wW)")
    spec = MaskSpec(None, window, query_block)
    layout = TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]
    kept = with_text(sta_table(grid, spec.sta_window, device), layout)[None, None]  # type: ignore[arg-type]
    return BlockSparseMask(group_rows(kept, spec.query_block), layout, spec.query_block)
