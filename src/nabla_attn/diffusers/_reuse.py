"""Reusing NABLA's block tables across denoising steps (``NablaConfig.mask_reuse_steps`` and
``mask_reuse_tolerance``; off by default).

Adjacent denoising steps see similar q and k, so the table built at one step often serves the next
ones. A table is rebuilt when it has served ``mask_reuse_steps`` steps, when the block means of q or
k drifted past ``mask_reuse_tolerance`` (relative L2 distance to the means it was built from), when
the shapes change, or when a new generation starts. What this saves is the mask build (pooling,
block scores, sort); the attention itself is unchanged. docs/quality.md measures the gain and cost.

The decision reads the step counter and, with a tolerance, a norm on the host, so it runs eagerly
(``torch._dynamo.disable``): one graph break per layer under torch.compile, paid only when enabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention import nabla_attention, tile
from ..grid import TokenLayout, VideoGrid
from ..masks import BlockSparseMask, MaskSpec, pool_blocks
from ._perhead import HeadSpec, head_attention


@dataclass
class _Entry:
    mask: BlockSparseMask
    step: int  # denoising step the table was built at
    key: tuple  # shapes and settings it is valid for
    means: tuple[torch.Tensor, torch.Tensor] | None  # q, k block means at build time (tolerance only)


class ReuseCache:
    """One per processor: tables per forward slot within a step (unbatched classifier-free guidance
    runs the conditional and unconditional forwards at one step; each keeps its own table)."""

    def __init__(self) -> None:
        self.entries: dict[int, _Entry] = {}
        self.step = -2
        self.slot = 0
        self.built = 0  # tables built (for tests and measurements)
        self.reused = 0

    def next_slot(self, step: int) -> int:
        if step != self.step:
            self.step, self.slot = step, 0
        else:
            self.slot += 1
        return self.slot


def _means(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, token_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        nv = layout.num_video_blocks
        if token_order == "natural":
            q, k = tile(q, layout), tile(k, layout)
        return pool_blocks(q, layout, nv), pool_blocks(k, layout, nv)


def _drift(now: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(now, then))


@torch._dynamo.disable
def reuse_attention(
    proc: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: VideoGrid, text_tokens: int,
    text_position: str, token_order: str, spec: MaskSpec | HeadSpec,
) -> tuple[torch.Tensor, BlockSparseMask]:  # fmt: skip
    """``nabla_attention`` with the layer's table reused where the config allows it."""
    cfg = proc.state.session.config
    cache: ReuseCache | None = getattr(proc, "_reuse_cache", None)
    if cache is None:
        cache = proc._reuse_cache = ReuseCache()
    step = proc.state.session.step
    slot = cache.next_slot(step)
    layout = TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]
    key = (layout, tuple(q.shape), q.device, token_order, spec)
    entry = cache.entries.get(slot)
    fresh = entry is None or entry.key != key or not (0 <= step - entry.step < cfg.mask_reuse_steps)
    means = None
    pooled = isinstance(spec, HeadSpec) or spec.threshold is not None  # a table that follows q and k
    if not fresh and cfg.mask_reuse_tolerance is not None and pooled:
        assert entry is not None and entry.means is not None
        means = _means(q, k, layout, token_order)
        fresh = _drift(means, entry.means) > cfg.mask_reuse_tolerance
    if not fresh:
        assert entry is not None
        cache.reused += 1
        out = nabla_attention(q, k, v, grid, None, None, text_tokens, text_position, mask=entry.mask,
                              backend=cfg.backend, token_order=token_order, precision=cfg.precision)  # type: ignore[arg-type]
        return out, entry.mask  # type: ignore[return-value]
    if isinstance(spec, HeadSpec):
        out, mask = head_attention(q, k, v, grid, text_tokens, text_position, token_order, spec, cfg.backend, proc.name,
                                   cfg.precision)
    else:
        out, mask = nabla_attention(
            q, k, v, grid, spec.threshold, spec.sta_window, text_tokens, text_position, backend=cfg.backend,
            query_block=spec.query_block, token_order=token_order, return_mask=True,  # type: ignore[arg-type]
            precision=cfg.precision,
        )  # fmt: skip
    if cfg.mask_reuse_tolerance is not None and pooled and means is None:
        means = _means(q, k, layout, token_order)
    cache.entries[slot] = _Entry(mask, step, key, means)
    cache.built += 1
    return out, mask
