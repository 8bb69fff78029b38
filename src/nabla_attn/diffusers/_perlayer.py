"""Per-layer mask settings of :class:`NablaConfig` (``layer_thresholds``), their resolution against a
model's self-attention layers, and reading calibration files into config fields.

Importable without diffusers (``_config`` uses it). Why per layer: attention-output error at a
given threshold differs a lot between layers (docs/quality.md), so one global threshold spends the
kept-block budget badly; :func:`nabla_attn.calibrate` measures that and writes a file whose
thresholds arrive here.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from ..masks import MaskSpec
from ._perhead import HeadSpec

LayerKey = Union[int, str]
LayerValue = Union[float, MaskSpec, "HeadSpec", Mapping[str, Any], list, tuple, None]
CALIBRATION_FORMAT = "nabla-calibration/1"


def _key(key: object) -> LayerKey:
    if isinstance(key, bool) or not isinstance(key, (numbers.Integral, str)):
        raise ValueError(f"layer_thresholds keys must be layer indices >= 0 or module names, got {key!r}")
    if isinstance(key, str):
        if not key:
            raise ValueError("layer_thresholds keys must not be empty strings")
        return key
    if int(key) < 0:
        raise ValueError(f"layer_thresholds keys must be layer indices >= 0 or module names, got {key!r}")
    return int(key)


def _spec(key: LayerKey, value: LayerValue, default: MaskSpec) -> MaskSpec | HeadSpec | None:
    """A layer's spec: a number replaces the config's threshold (keeping its STA window and query
    block), a list of numbers gives one threshold per head (:class:`HeadSpec`), a MaskSpec/HeadSpec
    or a {"threshold", "sta_window", "query_block"} mapping is taken whole, None means the layer
    stays dense."""
    try:
        if value is None:
            return None
        if isinstance(value, (MaskSpec, HeadSpec)):
            return value
        if isinstance(value, (list, tuple)):
            return HeadSpec(tuple(value), default.sta_window, default.query_block)
        if isinstance(value, Mapping):
            unknown = set(value) - {"threshold", "sta_window", "query_block"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} (allowed: threshold, sta_window, query_block)")
            window, qb = value.get("sta_window"), value.get("query_block", default.query_block)
            if isinstance(value.get("threshold"), (list, tuple)):
                return HeadSpec(tuple(value["threshold"]), None if window is None else tuple(window), qb)
            return MaskSpec(value.get("threshold"), window, qb)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"expected a threshold in (0, 1], a list of per-head thresholds, a MaskSpec or None, got {value!r}")
        return MaskSpec(float(value), default.sta_window, default.query_block)
    except ValueError as exc:
        raise ValueError(f"layer_thresholds[{key!r}]: {exc}") from None


def normalize_layer_thresholds(
    value: object, default: MaskSpec
) -> tuple[tuple[tuple[LayerKey, MaskSpec | HeadSpec], ...], tuple[LayerKey, ...]]:
    """``(sparse entries as (key, MaskSpec) pairs, keys of dense layers)`` from a mapping or pairs.

    The result is tuples so the frozen config stays hashable; dense entries (None) become
    ``exclude_layers`` so that dense layers keep the model's own processor, as excluded ones do.
    """
    if value is None:
        return (), ()
    items: Iterable[Any] = value.items() if isinstance(value, Mapping) else value  # type: ignore[assignment]
    if isinstance(value, (str, bytes)):
        raise ValueError(f"layer_thresholds must map layers to thresholds, got {value!r}")
    sparse: list[tuple[LayerKey, MaskSpec | HeadSpec]] = []
    dense: list[LayerKey] = []
    seen: set[LayerKey] = set()
    try:
        pairs = [tuple(item) for item in items]
    except TypeError:
        raise ValueError(f"layer_thresholds must be a mapping {{layer: threshold}}, got {value!r}") from None
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"layer_thresholds entries must be (layer, threshold) pairs, got {pair!r}")
        key = _key(pair[0])
        if key in seen:
            raise ValueError(f"layer_thresholds names layer {key!r} twice")
        seen.add(key)
        spec = _spec(key, pair[1], default)
        if spec is None:
            dense.append(key)
        else:
            sparse.append((key, spec))
    return tuple(sparse), tuple(dense)


def _matches(index: int, name: str, key: LayerKey) -> bool:
    if isinstance(key, int):
        return key == index
    return name == key or name.startswith(key + ".")


def resolve_layer_specs(entries: tuple[tuple[LayerKey, MaskSpec | HeadSpec], ...],
                        names: list[str]) -> dict[str, MaskSpec | HeadSpec]:
    """Layer name -> MaskSpec for the entries of ``layer_thresholds`` on a model whose self-attention
    layers are ``names`` (execution order). Raises ValueError for an entry that matches no layer or a
    layer that two entries give different settings (a silently unused threshold would make a
    calibration file look applied when it is not)."""
    out: dict[str, MaskSpec | HeadSpec] = {}
    for key, spec in entries:
        hits = [name for i, name in enumerate(names) if _matches(i, name, key)]
        if not hits:
            n = len(names)
            what = f"index {key} is out of range 0..{n - 1}" if isinstance(key, int) else f"{key!r} matches no layer"
            raise ValueError(f"layer_thresholds: {what}; the model's self-attention layers are {names[0]!r} ... {names[-1]!r} ({n})")
        for name in hits:
            if name in out and out[name] != spec:
                raise ValueError(f"layer_thresholds gives {name} two settings: {out[name]} and {spec}")
            out[name] = spec
    return out


def check_extra_fields(config: Any) -> None:
    """Validate and normalise ``layer_thresholds`` and the mask-reuse fields of a NablaConfig (called
    from its ``__post_init__``; frozen, hence ``object.__setattr__``)."""
    sparse, dense = normalize_layer_thresholds(config.layer_thresholds, config.mask_spec)
    object.__setattr__(config, "layer_thresholds", sparse)
    if dense:
        merged = tuple(dict.fromkeys(tuple(config.exclude_layers) + dense))
        object.__setattr__(config, "exclude_layers", merged)
    steps = config.mask_reuse_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"mask_reuse_steps must be an integer >= 1 (1 = rebuild every step), got {steps!r}")
    object.__setattr__(config, "mask_reuse_steps", int(steps))
    tol = config.mask_reuse_tolerance
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (float(tol) > 0.0):
            raise ValueError(f"mask_reuse_tolerance must be a number > 0 or None, got {tol!r}")
        if steps == 1:
            raise ValueError("mask_reuse_tolerance needs mask_reuse_steps > 1 (with 1 every step rebuilds its table)")
        object.__setattr__(config, "mask_reuse_tolerance", float(tol))


def calibration_fields(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """NablaConfig fields from a calibration file (or its parsed JSON): ``threshold`` (the best single
    threshold for the same target, used for layers the file does not name), ``sta_window``,
    ``query_block``, ``dense_steps`` and ``layer_thresholds``."""
    where = "calibration data"
    if not isinstance(source, Mapping):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
    else:
        data = source
    if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
        got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{where} is not a NABLA calibration file (format {got!r}, expected {CALIBRATION_FORMAT!r})")
    try:
        choice = data["choice"]
        layers = dict(choice["layer_thresholds"])
        return {
            "threshold": choice.get("fallback_threshold", 0.7),
            "sta_window": None if data.get("sta_window") is None else tuple(data["sta_window"]),
            "query_block": int(data.get("query_block", 64)),
            "dense_steps": int(choice.get("dense_steps", 0)),
            "layer_thresholds": layers,
        }
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: malformed calibration file ({type(exc).__name__}: {exc})") from None
