"""Video token grids and the permutation between natural and tiled token order.

A video DiT emits its tokens frame-major, ``(t, h, w)``. NABLA groups them into blocks of one
frame x an 8x8 spatial tile. The *tiled* order puts every block in a slot of exactly
``BLOCK_TOKENS = 64`` positions: the tile's tokens first (row-major inside the tile), padding after.
Edge tiles of grids whose height or width is not a multiple of 8 are smaller, so their slots hold
padding. Text tokens (if any) form extra blocks after the video blocks, whatever their position in
the natural sequence.

Padding positions are zeros on the way in, never enter a mean, a softmax or an output, and are
dropped on the way out. :func:`tile` and :func:`untile` here are the eager definitions (index
gathers); the GPU kernel that backends use computes the same permutation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from .cache import DeviceCache
from .constants import BLOCK_TOKENS, TILE
from .validation import as_choice, as_int, token_dim

TextPosition = Literal["end", "start"]
LayoutKey = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class VideoGrid:
    """The latent token grid after patchify: ``frames x height x width`` tokens."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            object.__setattr__(self, name, as_int(f"VideoGrid.{name}", getattr(self, name), 1))

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tile_rows(self) -> int:
        return -(-self.height // TILE)

    @property
    def tile_cols(self) -> int:
        return -(-self.width // TILE)

    @property
    def block_grid(self) -> tuple[int, int, int]:
        """Blocks along (frames, tile rows, tile columns)."""
        return (self.frames, self.tile_rows, self.tile_cols)

    @property
    def num_blocks(self) -> int:
        return self.frames * self.tile_rows * self.tile_cols


@dataclass(frozen=True)
class TokenLayout:
    """How a sequence of ``grid.num_tokens + text_tokens`` tokens maps onto 64-token blocks.

    Blocks ``0 .. num_video_blocks-1`` are video blocks numbered frame-major over
    ``(frame, tile row, tile column)``; the text blocks follow them.
    """

    grid: VideoGrid
    text_tokens: int = 0
    text_position: TextPosition = "end"

    def __post_init__(self) -> None:
        if not isinstance(self.grid, VideoGrid):
            raise TypeError(f"grid must be a nabla_attn.VideoGrid, got {type(self.grid).__name__}")
        object.__setattr__(self, "text_tokens", as_int("text_tokens", self.text_tokens, 0))
        as_choice("text_position", self.text_position, ("end", "start"))

    @property
    def seq_len(self) -> int:
        """Length of the natural sequence."""
        return self.grid.num_tokens + self.text_tokens

    @property
    def num_video_blocks(self) -> int:
        return self.grid.num_blocks

    @property
    def num_text_blocks(self) -> int:
        return -(-self.text_tokens // BLOCK_TOKENS)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks

    @property
    def tiled_len(self) -> int:
        """Length of the tiled sequence (``num_blocks * 64``, padding included)."""
        return self.num_blocks * BLOCK_TOKENS

    @property
    def padded(self) -> bool:
        """Some block holds padding slots (an edge tile or a partial text block)."""
        return self.tiled_len != self.seq_len

    @property
    def key(self) -> LayoutKey:
        """The layout as five ints (frames, height, width, text tokens, text first), e.g. for custom ops."""
        g = self.grid
        return (g.frames, g.height, g.width, self.text_tokens, int(self.text_position == "start"))

    @staticmethod
    def from_key(key: "LayoutKey | list[int]") -> "TokenLayout":
        f, h, w, text, start = key
        return TokenLayout(VideoGrid(f, h, w), text, "start" if start else "end")

    def describe(self) -> str:
        g = self.grid
        return f"{g.frames}x{g.height}x{g.width} = {g.num_tokens} video tokens + {self.text_tokens} text tokens"

    def block_counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Valid tokens in each block, int32 ``[num_blocks]`` (64 except at edges and the last text block)."""
        return self.table("counts", device)

    def gather_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """For each tiled position, its natural index, or ``seq_len`` for padding (int64 ``[tiled_len]``)."""
        return self.table("gather", device)

    def scatter_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """For each natural token, its tiled position (int64 ``[seq_len]``)."""
        return self.table("scatter", device)

    def valid_tokens(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[tiled_len]``: True where a tiled position holds a real token."""
        return self.table("valid", device)

    def table(self, kind: str, device: torch.device | str | None = None) -> torch.Tensor:
        """One of the layout's index tables (see ``TABLES``), cached per device."""
        make = TABLES[kind]
        if device is None:
            return make(self)
        return _ON_DEVICE.get((self, kind), device, lambda: make(self).to(device))


# --------------------------------------------------------------------------------- index tables
@functools.lru_cache(maxsize=64)
def _gather(layout: TokenLayout) -> torch.Tensor:
    g = layout.grid
    T, H, W = g.frames, g.height, g.width
    pad = layout.seq_len
    video_offset = layout.text_tokens if layout.text_position == "start" else 0
    text_offset = 0 if layout.text_position == "start" else g.num_tokens

    # Every (t, tile row, tile col, slot row, slot col) position; a slot row/col falls outside the
    # tile's real extent for edge tiles. Slots are then packed so valid tokens come first.
    t = torch.arange(T).view(T, 1, 1, 1, 1)
    i = torch.arange(g.tile_rows).view(1, -1, 1, 1, 1)
    j = torch.arange(g.tile_cols).view(1, 1, -1, 1, 1)
    r = torch.arange(TILE).view(1, 1, 1, TILE, 1)
    c = torch.arange(TILE).view(1, 1, 1, 1, TILE)
    h = i * TILE + r
    w = j * TILE + c
    valid = (h < H) & (w < W)
    natural = video_offset + t * (H * W) + h * W + w
    natural = torch.where(valid, natural, torch.full_like(natural, pad))
    natural = natural.reshape(g.num_blocks, BLOCK_TOKENS)
    valid = valid.expand_as(natural.view(T, g.tile_rows, g.tile_cols, TILE, TILE)).reshape(g.num_blocks, BLOCK_TOKENS)
    # Stable sort on "is padding" moves valid slots to the front and keeps their row-major order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    video = natural.gather(1, order).reshape(-1)

    text = torch.full((layout.num_text_blocks * BLOCK_TOKENS,), pad, dtype=torch.int64)
    text[: layout.text_tokens] = text_offset + torch.arange(layout.text_tokens)
    return torch.cat([video, text])


@functools.lru_cache(maxsize=64)
def _scatter(layout: TokenLayout) -> torch.Tensor:
    gather = _gather(layout)
    positions = torch.nonzero(gather < layout.seq_len).squeeze(1)
    out = torch.empty(layout.seq_len, dtype=torch.int64)
    out[gather[positions]] = positions
    return out


def _valid(layout: TokenLayout) -> torch.Tensor:
    return _gather(layout) < layout.seq_len


def _counts(layout: TokenLayout) -> torch.Tensor:
    return _valid(layout).view(layout.num_blocks, BLOCK_TOKENS).sum(1).to(torch.int32)


def _gather_source(layout: TokenLayout) -> torch.Tensor:
    """The gather index with padding slots pointing at token 0 (they are zeroed after the gather)."""
    gather = _gather(layout)
    return torch.where(gather < layout.seq_len, gather, torch.zeros_like(gather))


def _padding(layout: TokenLayout) -> torch.Tensor:
    return torch.nonzero(_gather(layout) >= layout.seq_len).squeeze(1)


def _tile_rows(layout: TokenLayout) -> torch.Tensor:
    """int32 gather index for the GPU permutation kernel: padding slots are -1 (zero rows)."""
    gather = _gather(layout)
    return torch.where(gather < layout.seq_len, gather, torch.full_like(gather, -1)).to(torch.int32)


def _untile_rows(layout: TokenLayout) -> torch.Tensor:
    return _scatter(layout).to(torch.int32)


def _query_pairs(layout: TokenLayout) -> torch.Tensor:
    """int32 ``[ceil(num_blocks / 2), 2]``: the pairs of 64-token blocks that share one stream of key
    blocks in the 64-row Gluon forward, each block in exactly one pair, ``-1`` for a missing partner.

    A video block pairs with the same tile in the next frame (frames 2i and 2i+1). Two such blocks
    see the scene from the same place, so their key lists have the same spatial extent: their
    lengths differ less and their union is shorter than for side-by-side tiles (docs/kernel-notes.md,
    v31). Blocks left over (the last frame of an odd frame count, text blocks) pair with their
    successor in block order.
    """
    g = layout.grid
    per_frame = g.tile_rows * g.tile_cols
    even = (g.frames // 2) * 2
    blocks = torch.arange(even * per_frame).view(even // 2, 2, per_frame)
    temporal = blocks.transpose(1, 2).reshape(-1, 2)
    rest = torch.arange(even * per_frame, layout.num_blocks)
    if rest.numel() % 2:
        rest = torch.cat([rest, torch.tensor([-1])])
    return torch.cat([temporal, rest.view(-1, 2)]).to(torch.int32)


TABLES = {
    "gather": _gather,
    "scatter": _scatter,
    "valid": _valid,
    "counts": _counts,
    "gather_source": _gather_source,
    "padding": _padding,
    "tile_rows": _tile_rows,
    "untile_rows": _untile_rows,
    "query_pairs": _query_pairs,
}
_ON_DEVICE: DeviceCache[torch.Tensor] = DeviceCache(256)


# ------------------------------------------------------------------------------ tile / untile
def _token_dim(x: torch.Tensor, dim: int, expect: int, what: str, layout: TokenLayout) -> int:
    d = token_dim(x, dim)
    if x.shape[d] != expect:
        raise ValueError(
            f"{what}: sequence length {x.shape[d]} along dim {dim} does not match the layout's "
            f"{expect} ({layout.describe()})"
        )
    return d


def tile(x: torch.Tensor, layout: TokenLayout, dim: int = -2) -> torch.Tensor:
    """Natural order -> tiled order along ``dim`` (``seq_len`` -> ``tiled_len`` tokens, padding = 0).

    Differentiable; the result is contiguous. ``dim=-2`` serves ``[B, H, S, D]`` and ``[B, S, C]``.
    """
    d = _token_dim(x, dim, layout.seq_len, "tile", layout)
    out = x.index_select(d, layout.table("gather_source", x.device))
    if layout.padded:
        out.index_fill_(d, layout.table("padding", x.device), 0)
    return out


def untile(x: torch.Tensor, layout: TokenLayout, dim: int = -2, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled order -> natural order along ``dim`` (padding dropped).

    ``like``: a natural-order tensor of the result's shape whose memory layout the result takes
    (``torch.empty_like``), e.g. q in ``[B, S, H, D]`` memory viewed as ``[B, H, S, D]``, so a
    caller that transposes back gets a free view instead of a copy.
    """
    d = _token_dim(x, dim, layout.tiled_len, "untile", layout)
    shape = (*x.shape[:d], layout.seq_len, *x.shape[d + 1 :])
    if like is not None and tuple(like.shape) != shape:
        raise ValueError(f"untile: like has shape {tuple(like.shape)}, the result has {shape}")
    out = x.index_select(d, layout.table("scatter", x.device))
    if like is not None and not like.is_contiguous():  # index_select already gives contiguous
        out = torch.empty_like(like, dtype=x.dtype).copy_(out)
    return out
