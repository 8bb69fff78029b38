"""The mask on the GPU: block means, the fused row kernel and row compaction as custom ops, and the
tiling kernel, shared by the backends that run on CUDA (``triton`` and ``flex``).

Same table as the eager definition (:mod:`nabla_attn.masks`) up to float32 rounding at the cut
(``kernels/mask_build.py`` says where); a table for STA alone is built eagerly (it has no scores).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..grid import TokenLayout
from ..masks import BlockSparseMask, MaskSpec, mask_from_means, num_query_blocks, pool_blocks
from .base import Backend, Request


# Facts of this process (constants under torch.compile, cached here).
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return _triton_available()


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before Triton's first import)."""
    return _interpreting()


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _interpreting() -> bool:
    if not _triton_available():
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)


@dataclass(frozen=True)
class KvLists:
    """Per query block of a table, the kept key blocks: counts int32 ``[B, H, Qb]`` and ascending
    indices int32 ``[B, H, Qb, Kb]`` (packed at the front). Derived from one table for one call."""

    counts: torch.Tensor
    indices: torch.Tensor


@torch.library.custom_op("nabla_attn::pool_means", mutates_args=())
def _pool_means(qt: torch.Tensor, kt: torch.Tensor, layout: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.mask_build import pool_pair, poolable

    lay = TokenLayout.from_key(layout)
    nv = lay.num_video_blocks
    if poolable(qt) and kt.shape == qt.shape and kt.stride() == qt.stride():
        return pool_pair(qt, kt, lay.block_counts(qt.device), nv)
    return pool_blocks(qt, lay, nv), pool_blocks(kt, lay, nv)


@_pool_means.register_fake
def _(qt, kt, layout):  # type: ignore[no-untyped-def]
    nv = TokenLayout.from_key(layout).num_video_blocks
    shape = (qt.shape[0], qt.shape[1], nv, qt.shape[-1])
    return qt.new_empty(shape, dtype=torch.float32), qt.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("nabla_attn::fused_mask", mutates_args=())
def _fused_mask(qa: torch.Tensor, ka: torch.Tensor, layout: Sequence[int], cut: float,
                window: Sequence[int] | None, query_block: int, lists: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.mask_build import block_scores, nabla_table

    lay = TokenLayout.from_key(layout)
    g = lay.grid
    return nabla_table(
        block_scores(qa, ka), device=qa.device, num_video_blocks=lay.num_video_blocks, num_blocks=lay.num_blocks,
        tile_rows=g.tile_rows, tile_cols=g.tile_cols, cut=cut, window=None if window is None else tuple(window),
        group=query_block // 64, write_lists=lists,
    )  # type: ignore[arg-type]


@_fused_mask.register_fake
def _(qa, ka, layout, cut, window, query_block, lists):  # type: ignore[no-untyped-def]
    lay = TokenLayout.from_key(layout)
    B, H = qa.shape[:2]
    nq, nb = num_query_blocks(lay, query_block), lay.num_blocks
    if not lists:
        return (qa.new_empty(B, H, nq, nb, dtype=torch.bool), qa.new_empty(1, 1, 1, dtype=torch.int32),
                qa.new_empty(1, 1, 1, 1, dtype=torch.int32))
    return (qa.new_empty(B, H, nq, nb, dtype=torch.bool), qa.new_empty(B, H, nq, dtype=torch.int32),
            qa.new_empty(B, H, nq, nb, dtype=torch.int32))


@torch.library.custom_op("nabla_attn::compact", mutates_args=())
def _compact(kept: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.mask_build import compact

    return compact(kept, transpose=transpose)


@_compact.register_fake
def _(kept, transpose):  # type: ignore[no-untyped-def]
    B, H, r, c = kept.shape
    if transpose:
        r, c = c, r
    return kept.new_empty(B, H, r, dtype=torch.int32), kept.new_empty(B, H, r, c, dtype=torch.int32)


def kv_lists(kept: torch.Tensor, transpose: bool = False) -> KvLists:
    """Row (or, ``transpose``, column) compaction of a bool table on the GPU."""
    return KvLists(*_compact(kept, transpose))


class GpuMaskBackend(Backend):
    """A backend on CUDA (or Triton's interpreter): tiling kernel, fused mask, kv lists if wanted."""

    wants_lists = False

    def unsupported(self, req: Request) -> str | None:
        if not triton_available():
            return "tensors without Triton installed (pip install 'nabla-attn[triton]')"
        if req.device.type != "cuda" and not interpreting():
            return f"tensors on {req.device} (it needs CUDA)"
        return None

    def auto_candidate(self, req: Request) -> bool:
        return req.device.type == "cuda"

    def fast_tiling(self, x: torch.Tensor) -> bool:
        return (x.is_cuda or interpreting()) and triton_available()

    def build_mask(self, qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, spec: MaskSpec,
                   means: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[BlockSparseMask, Any]:
        if spec.threshold is None:
            return self._static(layout, spec, qt.device)
        qa, ka = means if means is not None else _pool_means(qt.detach(), kt.detach(), layout.key)
        return self.mask_from_means(qa, ka, layout, spec)

    def mask_from_means(self, qa: torch.Tensor, ka: torch.Tensor, layout: TokenLayout,
                        spec: MaskSpec) -> tuple[BlockSparseMask, Any]:
        if spec.threshold is None:
            return self._static(layout, spec, qa.device)
        want = (*qa.shape[:2], layout.num_video_blocks, qa.shape[-1])
        if any(tuple(m.shape) != want or m.dtype != torch.float32 for m in (qa, ka)):
            raise ValueError(f"block means must be float32 {want}, got {[(m.dtype, tuple(m.shape)) for m in (qa, ka)]}")
        kept, counts, idx = _fused_mask(qa.detach(), ka.detach(), layout.key, spec.cut, spec.half_window,  # type: ignore[arg-type]
                                        spec.query_block, self.wants_lists)
        mask = BlockSparseMask(kept, layout, spec.query_block)
        return mask, (KvLists(counts, idx) if self.wants_lists else None)

    def _static(self, layout: TokenLayout, spec: MaskSpec, device: torch.device) -> tuple[BlockSparseMask, Any]:
        mask = mask_from_means(None, None, layout, spec, device)
        return mask, self.plan(mask)

    def plan(self, mask: BlockSparseMask) -> Any:
        return kv_lists(mask.kept) if self.wants_lists else None
