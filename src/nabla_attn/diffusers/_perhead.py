"""One NABLA threshold per attention head (``NablaConfig.layer_thresholds`` values that are lists).

Why: heads of one layer differ far more than layers do. On the bundled model at 20% kept, per-head
thresholds from :func:`nabla_attn.calibrate` cut the mean attention error from 0.35 (per-layer
thresholds) to 0.30 and raise PSNR against dense from 14.7 to 19.6 dB (docs/quality.md).

``MaskSpec`` (the core) holds one threshold, so the table is assembled here: q and k are tiled and
pooled once, and each distinct threshold builds its table from the block means of its heads
(``mask_from_means``, the same builder ``nabla_attention`` runs), then ``nabla_attention`` takes the
assembled table. On CUDA this costs one more pass over q and k than the fused natural-order path
(where the tiling kernel writes the means), and under torch.compile one graph break per per-head
layer; a MaskSpec with per-head cuts in the core would remove both.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..attention import mask_from_means, nabla_attention, tile, untile
from ..grid import TokenLayout, VideoGrid
from ..masks import BlockSparseMask, MaskSpec, pool_blocks


@dataclass(frozen=True)
class HeadSpec:
    """Per-head NABLA thresholds of one layer, with the layer's STA window and query block."""

    thresholds: tuple[float, ...]
    sta_window: tuple[int, int, int] | None = None
    query_block: int = 64

    def __post_init__(self) -> None:
        values = tuple(self.thresholds)
        if not values or any(isinstance(t, bool) or not isinstance(t, numbers.Real) for t in values):
            raise ValueError(f"per-head thresholds must be a non-empty list of numbers, got {self.thresholds!r}")
        specs = [MaskSpec(float(t), self.sta_window, self.query_block) for t in values]  # validates each
        object.__setattr__(self, "thresholds", tuple(s.threshold for s in specs))
        object.__setattr__(self, "sta_window", specs[0].sta_window)
        object.__setattr__(self, "query_block", specs[0].query_block)

    def specs(self) -> dict[float, tuple[MaskSpec, list[int]]]:
        """Distinct threshold -> (its MaskSpec, the heads that use it)."""
        out: dict[float, tuple[MaskSpec, list[int]]] = {}
        for h, t in enumerate(self.thresholds):
            out.setdefault(t, (MaskSpec(t, self.sta_window, self.query_block), []))[1].append(h)
        return out


# Eager under torch.compile (one graph break per per-head layer): pooling here reads the layout's
# cached index tables, a side effect dynamo cannot replay; inside nabla_attention's custom ops it is
# opaque. A MaskSpec with per-head cuts in the core would let the fused builder do this in-graph.
@torch._dynamo.disable
def head_mask(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, spec: HeadSpec, token_order: str,
              backend: str = "auto", name: str = "layer") -> BlockSparseMask:
    """The table of ``spec`` for q, k ``[B, H, S, D]`` (natural or tiled order)."""
    heads = q.shape[1]
    if len(spec.thresholds) != heads:
        raise ValueError(f"{name}: {len(spec.thresholds)} per-head thresholds for a layer with {heads} heads")
    with torch.no_grad():
        if token_order == "natural":
            q, k = tile(q, layout), tile(k, layout)
        nv = layout.num_video_blocks
        qa, ka = pool_blocks(q, layout, nv), pool_blocks(k, layout, nv)
        kept: torch.Tensor | None = None
        for mspec, idx in spec.specs().values():
            part = mask_from_means(qa[:, idx], ka[:, idx], layout, mspec, backend=backend)  # type: ignore[arg-type]
            if kept is None:
                kept = part.kept.new_zeros(q.shape[0], heads, *part.kept.shape[2:])
            kept[:, idx] = part.kept.expand(q.shape[0], len(idx), -1, -1)
    assert kept is not None
    return BlockSparseMask(kept, layout, spec.query_block)


def head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: VideoGrid, text_tokens: int, text_position: str,
    token_order: str, spec: HeadSpec, backend: str = "auto", name: str = "layer", precision: str = "bf16",
) -> tuple[torch.Tensor, BlockSparseMask]:  # fmt: skip
    """``nabla_attention`` with one threshold per head; returns the output and the table."""
    layout = TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]
    if token_order == "natural":  # tile once: the table and the attention both read tiled q, k
        q, k, v_t = tile(q, layout), tile(k, layout), tile(v, layout)
    else:
        v_t = v
    mask = head_mask(q, k, layout, spec, "tiled", backend, name)
    out = nabla_attention(q, k, v_t, grid, None, None, text_tokens, text_position, mask=mask, backend=backend,  # type: ignore[arg-type]
                          token_order="tiled", precision=precision)  # type: ignore[arg-type]
    if token_order == "natural":
        out = untile(out, layout, like=v)  # type: ignore[arg-type]
    return out, mask  # type: ignore[return-value]
