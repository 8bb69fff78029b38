"""NablaConfig: what ``apply_nabla`` does to a model. Importable without diffusers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

from ..attention import BACKENDS, check_precision
from ..masks import MaskSpec
from ..validation import as_choice, as_int
from ._perlayer import calibration_fields, check_extra_fields

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
        backend: ``nabla_attention`` backend: "auto", "triton", "flex", "cpu" or "reference".
        tiling: where tokens are permuted into NABLA's tiled order. "layer": q, k, v in every
            self-attention layer (and the output back). "forward" (Wan only): the hidden states, RoPE
            tables and per-token modulation once before the first block, back after the last, so
            every block runs on the tiled sequence, padding slots of edge tiles included. "auto":
            "forward" where it saves work, i.e. on Wan when the grid needs no padding (height and
            width multiples of 8 tokens), no layer is excluded and the step is sparse; else "layer".
            docs/diffusers.md gives the measured trade-off.
        collect_stats: record each layer's kept block density (read with ``nabla_stats``).
        layer_thresholds: per-layer settings, ``{layer: value}`` with layers as in ``exclude_layers``
            (index or module name/prefix); a number replaces ``threshold`` for that layer, a
            :class:`~nabla_attn.MaskSpec` replaces threshold, window and query block, ``None`` keeps
            the layer dense (it joins ``exclude_layers``). Stored as a tuple of ``(layer, MaskSpec)``
            pairs. :meth:`from_calibration` fills it from a :func:`nabla_attn.calibrate` file.
        mask_reuse_steps: a NABLA table serves up to this many consecutive sparse steps before it is
            rebuilt from the current q, k (1: rebuilt every step, the default). Off by default
            because it adds a graph break per layer under torch.compile.
        mask_reuse_tolerance: with ``mask_reuse_steps > 1``, rebuild earlier when the block means of
            q or k moved by more than this relative L2 distance since the table was built.
        precision: "bf16" (default) or "fp8": ``nabla_attention``'s forward-only e4m3 Q.K^T on the
            Triton backend (CUDA sm_89+, no gradients, no context parallelism; docs/fp8.md).

    Text tokens need no setting: HunyuanVideo (text after video) and CogVideoX (text before video)
    are handled from the model's own inputs; text blocks are always fully attended.

    Models that carry NABLA settings in their config (Kandinsky 5 NABLA checkpoints, Kandinsky 6 SR)
    give them through :meth:`from_model`; ``apply_nabla(pipe)`` without a config uses them.
    """

    threshold: float | None = 0.7
    sta_window: tuple[int, int, int] | None = None
    dense_steps: int = 0
    exclude_layers: tuple[LayerSelector, ...] = ()
    query_block: int = 64
    backend: Literal["auto", "reference", "flex", "cpu", "triton"] = "auto"
    tiling: Literal["auto", "layer", "forward"] = "auto"
    collect_stats: bool = True
    layer_thresholds: Any = ()
    mask_reuse_steps: int = 1
    mask_reuse_tolerance: float | None = None
    precision: Literal["bf16", "fp8"] = "bf16"

    def __post_init__(self) -> None:
        spec = self.mask_spec  # validates threshold, sta_window and query_block once
        object.__setattr__(self, "threshold", spec.threshold)
        object.__setattr__(self, "sta_window", spec.sta_window)
        object.__setattr__(self, "query_block", spec.query_block)
        try:
            object.__setattr__(self, "dense_steps", as_int("dense_steps", self.dense_steps, 0))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
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
        as_choice("backend", self.backend, BACKENDS)
        as_choice("tiling", self.tiling, ("auto", "layer", "forward"))
        check_precision(self.precision, self.backend)
        check_extra_fields(self)  # layer_thresholds (dense entries join exclude_layers), mask reuse

    @property
    def mask_spec(self) -> MaskSpec:
        """The mask part of the config (threshold, STA window, query block) as one validated spec."""
        try:
            return MaskSpec(self.threshold, self.sta_window, self.query_block)
        except ValueError as exc:
            raise ValueError(f"NablaConfig: {exc}") from None

    @classmethod
    def from_model(cls, model: Any, **overrides: Any) -> "NablaConfig":
        """The NABLA settings a checkpoint defines itself, with ``overrides`` (any field) on top.

        Kandinsky 5 (``attention_type="nabla"``): ``threshold=attention_P``, ``sta_window=(attention_wT,
        attention_wH, attention_wW)`` with even sizes rounded up to the odd size they act as (diffusers
        keeps ``|d| <= w // 2``), ``query_block=64`` (its 64-token blocks). Kandinsky 6 SR:
        ``threshold=nabla_threshold``, ``sta_window=nabla_window``. ``model`` may be a pipeline.
        Raises ValueError for a model without such settings (e.g. Kandinsky 5 ``attention_type="regular"``).
        """
        from . import model_config  # needs diffusers: imported on use

        config = model_config(model)
        if config is None:
            raise ValueError(
                f"{type(model).__name__} defines no NABLA settings of its own (only Kandinsky 5 NABLA checkpoints "
                "and Kandinsky 6 SR do); build a NablaConfig(...) instead"
            )
        return dataclasses.replace(config, **overrides)

    @classmethod
    def from_calibration(cls, source: Any, **overrides: Any) -> "NablaConfig":
        """The settings a :func:`nabla_attn.calibrate` file (path or parsed JSON) chose: per-layer
        thresholds (dense layers excluded), dense steps, STA window and query block, with
        ``overrides`` (any field) on top. Raises FileNotFoundError / ValueError naming the file."""
        return cls(**{**calibration_fields(source), **overrides})
