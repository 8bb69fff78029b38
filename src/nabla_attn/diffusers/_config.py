"""NablaConfig: what ``apply_nabla`` does to a model. Importable without diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

from ..attention import BACKENDS
from ..masks import QUERY_BLOCKS, check_sta_window, check_threshold

LayerSelector = Union[int, str]


@dataclass(frozen=True)
class NablaConfig:
    """Settings for :func:`nabla_attn.diffusers.apply_nabla`.

    Attributes:
        threshold: kept softmax mass of NABLA's block selection, in (0, 1]. ``1.0`` keeps every block
            (exact dense attention through the sparse path); ``None`` with ``sta_window`` is pure STA.
        sta_window: ``(wT, wH, wW)`` odd window in blocks (1 frame x 8x8 tokens), unioned with the
            NABLA mask; ``None`` for NABLA alone.
        dense_steps: the first ``dense_steps`` denoising steps run the model's own dense attention.
            A step is a change of the timestep value between transformer forwards (see docs/diffusers.md).
        exclude_layers: self-attention layers that stay dense: integers index the model's
            self-attention layers in execution order (Wan: block i; HunyuanVideo: dual-stream blocks
            first, then single-stream blocks), strings are module names (``"blocks.0.attn1"``) or
            prefixes of them (``"single_transformer_blocks"``).
        query_block: 64 (the paper's blocks) or 128 (pairs of tiles per query block; faster kernels).
        backend: ``nabla_attention`` backend: "auto", "triton", "flex" or "reference".
        tiling: where tokens are permuted into NABLA's tiled order. "layer": q, k, v in every
            self-attention layer (and the output back). "forward" (Wan only): the hidden states, RoPE
            tables and per-token modulation once before the first block, back after the last, so
            every block runs on the tiled sequence, padding slots of edge tiles included. "auto":
            "forward" where it saves work, i.e. on Wan when the grid needs no padding (height and
            width multiples of 8 tokens), no layer is excluded and the step is sparse; else "layer".
            docs/diffusers.md gives the measured trade-off.
        collect_stats: record each layer's kept block density (read with ``nabla_stats``).

    Text tokens need no setting: HunyuanVideo (text after video) and CogVideoX (text before video)
    are handled from the model's own inputs; text blocks are always fully attended.
    """

    threshold: float | None = 0.7
    sta_window: tuple[int, int, int] | None = None
    dense_steps: int = 0
    exclude_layers: tuple[LayerSelector, ...] = ()
    query_block: int = 64
    backend: Literal["auto", "reference", "flex", "triton"] = "auto"
    tiling: Literal["auto", "layer", "forward"] = "auto"
    collect_stats: bool = True

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        window = check_sta_window(self.sta_window)
        if self.threshold is None and window is None:
            raise ValueError("NablaConfig needs a threshold, an sta_window, or both (got neither)")
        object.__setattr__(self, "sta_window", window)
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be an integer >= 0, got {self.dense_steps!r}")
        layers: Sequence[LayerSelector] = self.exclude_layers
        if isinstance(layers, (int, str)):
            layers = (layers,)
        try:
            layers = tuple(layers)
        except TypeError:
            raise ValueError(f"exclude_layers must be a sequence of ints and strings, got {self.exclude_layers!r}") from None
        for item in layers:
            if isinstance(item, bool) or not isinstance(item, (int, str)) or (isinstance(item, int) and item < 0):
                raise ValueError(f"exclude_layers entries must be layer indices >= 0 or module names, got {item!r}")
        object.__setattr__(self, "exclude_layers", layers)
        if self.query_block not in QUERY_BLOCKS:
            raise ValueError(f"query_block must be one of {QUERY_BLOCKS}, got {self.query_block!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.tiling not in ("auto", "layer", "forward"):
            raise ValueError(f"tiling must be 'auto', 'layer' or 'forward', got {self.tiling!r}")
