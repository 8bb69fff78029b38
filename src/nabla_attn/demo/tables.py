"""Block tables for the demo model's processor: NABLA with one threshold per head, and a table as a
token mask for PyTorch SDPA (training on CPU, where SDPA's fused backward beats the reference
backend's gathers)."""

from __future__ import annotations

import torch

from ..attention import nabla_mask_tiled
from ..constants import BLOCK_TOKENS
from ..grid import TokenLayout
from ..masks import BlockSparseMask


def nabla_table(qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, threshold: float | tuple[float, ...],
                 window: tuple[int, int, int] | None, query_block: int, backend: str) -> BlockSparseMask:
    """NABLA's table; with one threshold per head, one build per distinct threshold on its heads."""
    if not isinstance(threshold, tuple):
        return nabla_mask_tiled(qt, kt, layout, threshold, window, query_block=query_block, backend=backend)  # type: ignore[arg-type]
    if len(threshold) != qt.shape[1]:
        raise ValueError(f"{len(threshold)} per-head thresholds for {qt.shape[1]} heads")
    parts = {}
    for t in sorted(set(threshold)):
        heads = [h for h, x in enumerate(threshold) if x == t]
        parts[t] = (heads, nabla_mask_tiled(qt[:, heads], kt[:, heads], layout, t, window, query_block=query_block,
                                            backend=backend).kept)  # type: ignore[arg-type]
    first = next(iter(parts.values()))[1]
    kept = first.new_zeros(qt.shape[0], qt.shape[1], *first.shape[2:])
    for heads, table in parts.values():
        kept[:, heads] = table.expand(qt.shape[0], len(heads), -1, -1)
    return BlockSparseMask(kept, layout, query_block)


def token_mask(mask: BlockSparseMask, batch: int, heads: int) -> torch.Tensor:
    """The block table as a bool ``[B, H, S, S]`` token mask in natural order (pair (i, j) kept iff
    the table keeps (block(i), block(j)))."""
    layout = mask.layout
    block = layout.scatter_index(mask.kept.device) // BLOCK_TOKENS  # natural token -> its 64-token block
    row = block // (mask.query_block // BLOCK_TOKENS)
    kept = mask.kept.expand(batch, heads, -1, -1)
    return kept[:, :, row][:, :, :, block]
