"""Tiling, untiling and the eager mask as ``torch.library`` custom ops.

As custom ops (with fake implementations and registered autograd) they are single opaque nodes to
``torch.compile``: a compiled diffusers block traces through NABLA without a graph break, and their
index tables, caches and kernel launches stay eager Python. Layouts travel as five ints
(:attr:`TokenLayout.key`).

``kernel=True`` runs the GPU row-permutation kernel (``kernels/permute.py``), which can also write
the float32 video-block means of q and k on the way (``pool``); ``kernel=False`` runs the eager
definition (:func:`nabla_attn.grid.tile`). Both give the same bits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import grid
from ..grid import TokenLayout
from ..masks import BlockSparseMask, MaskSpec, num_query_blocks, reference_mask as _reference_mask
from ..validation import token_dim


def _as_rows(x: torch.Tensor, d: int) -> torch.Tensor | None:
    """A 4-D view of ``x`` with the token axis at -2 and unit stride in the last dim, if there is one."""
    v = x.movedim(d, -2)
    if v.dim() == 3:
        v = v.unsqueeze(1)
    return v if v.dim() == 4 and v.stride(-1) == 1 else None


def _tiled_shape(x: torch.Tensor, d: int, n: int) -> list[int]:
    shape = list(x.shape)
    shape[d] = n
    return shape


def _means_shape(x: torch.Tensor, layout: TokenLayout, d: int, pool: bool) -> list[int]:
    return [x.shape[0], x.shape[1], layout.num_video_blocks, x.shape[-1]] if pool else [0]


def _poolable(x: torch.Tensor, layout: TokenLayout, d: int, kernel: bool) -> bool:
    from ..kernels.mask_build import poolable

    return kernel and x.dim() == 4 and d == 2 and layout.num_video_blocks > 0 and poolable(x)


@torch.library.custom_op("nabla_attn::tile", mutates_args=())
def _tile(x: torch.Tensor, layout: Sequence[int], dim: int, kernel: bool, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lay = TokenLayout.from_key(layout)
    d = token_dim(x, dim)
    rows = _as_rows(x, d) if kernel else None
    if rows is None:
        if pool:
            raise RuntimeError("tile: pooling needs the tiling kernel")
        return grid.tile(x, lay, d), x.new_empty(0, dtype=torch.float32)
    from ..kernels.permute import gather_rows

    out = x.new_empty(_tiled_shape(x, d, lay.tiled_len))
    means = x.new_empty(_means_shape(x, lay, d, pool), dtype=torch.float32)
    gather_rows(rows, lay.table("tile_rows", x.device), _as_rows(out, d), means if pool else None,  # type: ignore[arg-type]
                lay.block_counts(x.device) if pool else None)
    return out, means


@_tile.register_fake
def _(x, layout, dim, kernel, pool):  # type: ignore[no-untyped-def]
    lay = TokenLayout.from_key(layout)
    d = token_dim(x, dim)
    return x.new_empty(_tiled_shape(x, d, lay.tiled_len)), x.new_empty(_means_shape(x, lay, d, pool), dtype=torch.float32)


def untile_output(x: torch.Tensor, lay: TokenLayout, d: int, like: torch.Tensor | None) -> torch.Tensor:
    """An empty natural-order tensor for tiled ``x`` (token axis ``d``): ``like``'s memory layout
    where it has unit stride in the last dim, else contiguous."""
    shape = _tiled_shape(x, d, lay.seq_len)
    if like is not None:
        out = torch.empty_like(like, dtype=x.dtype)
        if out.stride(-1) == 1:
            return out
    return x.new_empty(shape)


@torch.library.custom_op("nabla_attn::untile", mutates_args=())
def _untile(x: torch.Tensor, layout: Sequence[int], dim: int, kernel: bool, like: torch.Tensor | None) -> torch.Tensor:
    lay = TokenLayout.from_key(layout)
    d = token_dim(x, dim)
    out = untile_output(x, lay, d, like)
    rows, out_rows = (_as_rows(x, d), _as_rows(out, d)) if kernel else (None, None)
    if rows is None or out_rows is None:
        natural = grid.untile(x, lay, d)
        return natural if out.is_contiguous() and natural.stride() == out.stride() else out.copy_(natural)
    from ..kernels.permute import gather_rows

    gather_rows(rows, lay.table("untile_rows", x.device), out_rows)
    return out


@_untile.register_fake
def _(x, layout, dim, kernel, like):  # type: ignore[no-untyped-def]
    return untile_output(x, TokenLayout.from_key(layout), token_dim(x, dim), like)


def _tile_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, ctx.layout, ctx.dim, ctx.kernel, _ = inputs


def _tile_backward(ctx, grad, grad_means):  # type: ignore[no-untyped-def]
    return _untile(grad, ctx.layout, ctx.dim, ctx.kernel, None), None, None, None, None


def _untile_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, ctx.layout, ctx.dim, ctx.kernel, _ = inputs


def _untile_backward(ctx, grad):  # type: ignore[no-untyped-def]
    return _tile(grad, ctx.layout, ctx.dim, ctx.kernel, False)[0], None, None, None, None


_tile.register_autograd(_tile_backward, setup_context=_tile_setup)
_untile.register_autograd(_untile_backward, setup_context=_untile_setup)


def tile(x: torch.Tensor, layout: TokenLayout, *, dim: int = -2, kernel: bool = False,
         pool: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Natural -> tiled order along ``dim`` (differentiable), and with ``pool`` the float32
    video-block means ``[B, H, Nv, D]`` of ``[B, H, S, D]`` where the kernel can write them (else None)."""
    d = token_dim(x, dim)
    if x.shape[d] != layout.seq_len:
        raise ValueError(f"tile: sequence length {x.shape[d]} along dim {dim} does not match the layout's "
                         f"{layout.seq_len} ({layout.describe()})")
    pool = pool and _poolable(x, layout, d, kernel)
    out, means = _tile(x, layout.key, d, kernel and x.numel() > 0, pool)
    return out, (means if pool else None)


def untile(x: torch.Tensor, layout: TokenLayout, *, dim: int = -2, kernel: bool = False,
           like: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled -> natural order along ``dim`` (differentiable); ``like`` as in :func:`nabla_attn.grid.untile`."""
    d = token_dim(x, dim)
    if x.shape[d] != layout.tiled_len:
        raise ValueError(f"untile: expected {layout.tiled_len} tiled tokens along dim {dim}, got {x.shape[d]}")
    shape = _tiled_shape(x, d, layout.seq_len)
    if like is not None and list(like.shape) != shape:
        raise ValueError(f"untile: like has shape {tuple(like.shape)}, the result has {tuple(shape)}")
    return _untile(x, layout.key, d, kernel and x.numel() > 0, like)


# ----------------------------------------------------------------------------------- eager mask
@torch.library.custom_op("nabla_attn::reference_mask", mutates_args=())
def _reference_mask_op(qt: torch.Tensor, kt: torch.Tensor, layout: Sequence[int], threshold: float | None,
                       window: Sequence[int] | None, query_block: int) -> torch.Tensor:
    spec = MaskSpec(threshold, None if window is None else tuple(window), query_block)
    return _reference_mask(qt, kt, TokenLayout.from_key(layout), spec).kept


@_reference_mask_op.register_fake
def _(qt, kt, layout, threshold, window, query_block):  # type: ignore[no-untyped-def]
    lay = TokenLayout.from_key(layout)
    B, H = (qt.shape[0], qt.shape[1]) if threshold is not None else (1, 1)
    return qt.new_empty(B, H, num_query_blocks(lay, query_block), lay.num_blocks, dtype=torch.bool)


def reference_mask(qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, spec: MaskSpec) -> BlockSparseMask:
    """:func:`nabla_attn.masks.reference_mask` as one opaque node (no gradient flows into a mask)."""
    kept = _reference_mask_op(qt.detach(), kt.detach(), layout.key, spec.threshold,
                              None if spec.sta_window is None else list(spec.sta_window), spec.query_block)
    return BlockSparseMask(kept, layout, spec.query_block)
