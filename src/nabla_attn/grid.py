"""Video token grids and the permutation between natural and tiled token order.

A video DiT emits its tokens frame-major, ``(t, h, w)``. NABLA groups them into blocks of one
frame x an 8x8 spatial tile. The *tiled* layout puts every block in a slot of exactly
``BLOCK_TOKENS = 64`` positions: the tile's tokens first (row-major inside the tile), padding after.
Edge tiles of grids whose height or width is not a multiple of 8 are smaller, so their slots hold
padding. Text tokens (if any) form extra blocks after the video blocks, whatever their position in
the natural sequence.

Padding positions are zeros on the way in, never enter a mean, a softmax or an output, and are
dropped on the way out. Every backend reads the same :class:`TokenLayout`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

TILE = 8
BLOCK_TOKENS = TILE * TILE

TextPosition = Literal["end", "start"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class VideoGrid:
    """The latent token grid after patchify: ``frames x height x width`` tokens."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        _positive_int("VideoGrid.frames", self.frames)
        _positive_int("VideoGrid.height", self.height)
        _positive_int("VideoGrid.width", self.width)

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
            raise TypeError(f"grid must be a VideoGrid, got {type(self.grid).__name__}")
        if isinstance(self.text_tokens, bool) or not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"text_tokens must be an integer >= 0, got {self.text_tokens!r}")
        if self.text_position not in ("end", "start"):
            raise ValueError(f"text_position must be 'end' or 'start', got {self.text_position!r}")

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

    def block_counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Valid tokens in each block, int32 ``[num_blocks]`` (64 except at edges and the last text block)."""
        return _block_counts(self).to(device)

    def gather_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """For each tiled position, its natural index, or ``seq_len`` for padding (int64 ``[tiled_len]``)."""
        return _gather_index(self).to(device)

    def scatter_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """For each natural token, its tiled position (int64 ``[seq_len]``)."""
        return _scatter_index(self).to(device)

    def valid_tokens(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[tiled_len]``: True where a tiled position holds a real token."""
        return (_gather_index(self) < self.seq_len).to(device)


@functools.lru_cache(maxsize=64)
def _gather_index(layout: TokenLayout) -> torch.Tensor:
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
def _scatter_index(layout: TokenLayout) -> torch.Tensor:
    gather = _gather_index(layout)
    positions = torch.nonzero(gather < layout.seq_len).squeeze(1)
    out = torch.empty(layout.seq_len, dtype=torch.int64)
    out[gather[positions]] = positions
    return out


@functools.lru_cache(maxsize=64)
def _block_counts(layout: TokenLayout) -> torch.Tensor:
    valid = _gather_index(layout) < layout.seq_len
    return valid.view(layout.num_blocks, BLOCK_TOKENS).sum(1).to(torch.int32)


_device_cache: dict[tuple[TokenLayout, str, str], torch.Tensor] = {}


@functools.lru_cache(maxsize=64)
def _gather_source(layout: TokenLayout) -> torch.Tensor:
    """The gather index with padding slots pointing at token 0 (they are zeroed after the gather)."""
    gather = _gather_index(layout)
    return torch.where(gather < layout.seq_len, gather, torch.zeros_like(gather))


@functools.lru_cache(maxsize=64)
def _padding_slots(layout: TokenLayout) -> torch.Tensor:
    return torch.nonzero(_gather_index(layout) >= layout.seq_len).squeeze(1)


@functools.lru_cache(maxsize=64)
def _tile_rows(layout: TokenLayout) -> torch.Tensor:
    """int32 gather index for the GPU permutation kernel: padding slots are -1 (zero rows)."""
    gather = _gather_index(layout)
    return torch.where(gather < layout.seq_len, gather, torch.full_like(gather, -1)).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _untile_rows(layout: TokenLayout) -> torch.Tensor:
    return _scatter_index(layout).to(torch.int32)


_SOURCES = {
    "tile_rows": _tile_rows,
    "untile_rows": _untile_rows,
    "gather": _gather_index,
    "gather_source": _gather_source,
    "padding": _padding_slots,
    "scatter": _scatter_index,
    "counts": _block_counts,
}


def _on_device(kind: str, layout: TokenLayout, device: torch.device) -> torch.Tensor:
    key = (layout, kind, str(device))
    cached = _device_cache.get(key)
    if cached is None:
        cached = _SOURCES[kind](layout).to(device)
        if len(_device_cache) > 256:
            _device_cache.clear()
        _device_cache[key] = cached
    return cached


def tile(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Natural order ``[..., seq_len, D]`` -> tiled order ``[..., tiled_len, D]`` (padding = 0).

    Differentiable. ``dim=-2`` is the token axis, so both ``[B, H, S, D]`` and ``[B, S, C]`` work;
    a strided input (e.g. ``[B, S, H, D]`` transposed) is read in place, without a copy first.
    The result is contiguous.
    """
    if x.shape[-2] != layout.seq_len:
        raise ValueError(
            f"tile: sequence length {x.shape[-2]} does not match the layout's {layout.seq_len} "
            f"({layout.grid.frames}x{layout.grid.height}x{layout.grid.width} video + {layout.text_tokens} text)"
        )
    if _gpu_permute(x):
        return _TileRows.apply(x, layout)
    # One gather pass, then zero the (few) padding slots in place.
    out = x.index_select(-2, _on_device("gather_source", layout, x.device))
    if layout.tiled_len != layout.seq_len:
        out.index_fill_(-2, _on_device("padding", layout, x.device), 0)
    return out


def tile_pooled(x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`tile`, plus NABLA's float32 video-block means ``[B, H, num_video_blocks, D]`` of ``x``
    (``[B, H, S, D]``) computed by the same pass, where the GPU permutation kernel runs (CUDA, a
    power-of-two head_dim); elsewhere the means are None and the mask builder pools by itself.
    The means are the same bits as the builder's own pooling of the tiled tensor.
    """
    nv = layout.num_video_blocks
    # (A wrong sequence length goes to tile, which names it.)
    if not (_gpu_permute(x) and x.dim() == 4 and nv > 0 and x.shape[-2] == layout.seq_len):
        return tile(x, layout), None
    from .kernels.mask_build import poolable

    if not poolable(x):
        return tile(x, layout), None
    means = torch.empty(x.shape[0], x.shape[1], nv, x.shape[-1], dtype=torch.float32, device=x.device)
    return _TileRows.apply(x, layout, means), means


def untile(x: torch.Tensor, layout: TokenLayout, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled order ``[..., tiled_len, D]`` -> natural order ``[..., seq_len, D]`` (padding dropped).

    ``like``: a natural-order tensor of the result's shape whose memory layout the result takes
    (``torch.empty_like``), e.g. q in ``[B, S, H, D]`` memory viewed as ``[B, H, S, D]``, so a
    caller that transposes back gets a free view instead of a copy.
    """
    if x.shape[-2] != layout.tiled_len:
        raise ValueError(f"untile: expected {layout.tiled_len} tiled tokens, got {x.shape[-2]}")
    shape = (*x.shape[:-2], layout.seq_len, x.shape[-1])
    if like is not None and tuple(like.shape) != shape:
        raise ValueError(f"untile: like has shape {tuple(like.shape)}, the result has {shape}")
    if _gpu_permute(x):
        return _UntileRows.apply(x, layout, like)
    out = x.index_select(-2, _on_device("scatter", layout, x.device))
    if like is not None and not like.is_contiguous():  # index_select already gives contiguous
        out = torch.empty_like(like, dtype=x.dtype).copy_(out)
    return out


def _gpu_permute(x: torch.Tensor) -> bool:
    """The Triton row-permutation kernel serves CUDA tensors of 3 or 4 dims with unit stride in D."""
    if not x.is_cuda or x.dim() not in (3, 4) or x.stride(-1) != 1 or x.numel() == 0:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _as4(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 4 else x.unsqueeze(1)


def _permute_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, means: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    from .kernels.permute import gather_rows

    gather_rows(_as4(x), index, _as4(out), means, counts)
    return out


class _TileRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: TokenLayout,  # type: ignore[override]
                means: torch.Tensor | None = None) -> torch.Tensor:
        """``means``: a float32 buffer the kernel fills with the video-block means (no gradient)."""
        ctx.layout = layout
        out = x.new_empty((*x.shape[:-2], layout.tiled_len, x.shape[-1]))
        counts = _on_device("counts", layout, x.device) if means is not None else None
        return _permute_rows(x, _on_device("tile_rows", layout, x.device), out, means, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return untile(grad, ctx.layout), None, None


class _UntileRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: TokenLayout, like: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.layout = layout
        shape = (*x.shape[:-2], layout.seq_len, x.shape[-1])
        out = torch.empty_like(like, dtype=x.dtype) if like is not None else x.new_empty(shape)
        if out.stride(-1) != 1:
            out = x.new_empty(shape)
        return _permute_rows(x, _on_device("untile_rows", layout, x.device), out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return tile(grad, ctx.layout), None, None


def block_counts_on(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """Cached int32 ``[num_blocks]`` valid-token counts on ``device``."""
    return _on_device("counts", layout, device)
