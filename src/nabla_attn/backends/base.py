"""What a backend is: what it supports, how it tiles and builds its mask on its device, its attention.

A backend works on tiled tensors (``[B, H, tiled_len, D]``, see :mod:`nabla_attn.grid`) and block
tables (:class:`~nabla_attn.masks.BlockSparseMask`); none knows about models. The defaults here are
the eager definitions, so a backend overrides only what it does faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..grid import TokenLayout
from ..masks import BlockSparseMask, MaskSpec, mask_from_means
from . import tiling


@dataclass(frozen=True)
class Request:
    """What a call needs, as plain values (so a backend choice can be cached and is constant under
    ``torch.compile``): the tensors' device and dtype, q's and v's head dims, whether a backward
    pass follows, and the query-block size."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    v_head_dim: int
    needs_grad: bool
    query_block: int

    @staticmethod
    def of(q: torch.Tensor, v: torch.Tensor, query_block: int) -> "Request":
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
        return Request(q.device, q.dtype, q.shape[-1], v.shape[-1], needs_grad, query_block)


class Backend:
    """Block-sparse attention on tiled tensors. Subclasses set ``name`` and override what they do
    faster than the eager definitions; :mod:`nabla_attn.backends` registers them."""

    name = ""
    fallback = "backend='reference'"

    def unsupported(self, req: Request) -> str | None:
        """Why this backend cannot run ``req`` (None when it can)."""
        return None

    def auto_candidate(self, req: Request) -> bool:
        """Whether ``backend="auto"`` considers this backend for ``req`` (in registry order)."""
        return True

    def fast_tiling(self, x: torch.Tensor) -> bool:
        """Whether tiling ``x`` runs the GPU permutation kernel (else the eager gather)."""
        return False

    def tile(self, x: torch.Tensor, layout: TokenLayout, *, pool: bool = False,
             dim: int = -2) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Natural -> tiled order along ``dim``; with ``pool`` also the float32 video-block means of
        ``[B, H, S, D]`` where the tiling kernel can write them on the way (else None)."""
        return tiling.tile(x, layout, dim=dim, kernel=self.fast_tiling(x), pool=pool)

    def untile(self, x: torch.Tensor, layout: TokenLayout, like: torch.Tensor | None = None,
               dim: int = -2) -> torch.Tensor:
        return tiling.untile(x, layout, dim=dim, kernel=self.fast_tiling(x), like=like)

    def build_mask(self, qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, spec: MaskSpec,
                   means: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[BlockSparseMask, Any]:
        """NABLA's table for tiled q, k (``means``: their block means, when tiling wrote them) and
        whatever this backend's attention derives from it (passed back to :meth:`attention`)."""
        mask = tiling.reference_mask(qt, kt, layout, spec)
        return mask, self.plan(mask)

    def mask_from_means(self, qa: torch.Tensor, ka: torch.Tensor, layout: TokenLayout,
                        spec: MaskSpec) -> tuple[BlockSparseMask, Any]:
        """The table from float32 video-block means ``[B, H, Nv, D]`` (the distributed path pools itself)."""
        mask = mask_from_means(qa, ka, layout, spec, qa.device)
        return mask, self.plan(mask)

    def plan(self, mask: BlockSparseMask) -> Any:
        """What :meth:`attention` derives from a table (kv lists, ...), built fresh from ``mask.kept``."""
        return None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float) -> torch.Tensor:
        raise NotImplementedError
