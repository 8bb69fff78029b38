"""``nabla_attn.calibrate``: per-layer thresholds, dense layers and dense steps for a kept-block budget.

NABLA's threshold trades speed for quality and its effect differs per model and per layer (the
paper: "must be found by experiment"). Calibration measures it: the model runs a few denoising
steps on calibration inputs with dense attention, and at every self-attention layer and step the
attention output of each candidate mask (a threshold grid, optionally with an STA window) is
compared with dense on the same q, k, v (relative L2 error, and kept fraction, per head). A
knapsack solver (``_calibsolve``) then picks per layer a candidate or dense, and a number of dense
first steps, that minimise the mean error at a target mean kept fraction (or the kept fraction at a
target error). The result saves as a small JSON file that ``NablaConfig.from_calibration`` loads::

    cal = nabla_attn.calibrate(pipe, [dict(prompt="a fox", num_inference_steps=12)], density=0.2,
                               out="nabla_calibration.json", plot="nabla_calibration.png")
    apply_nabla(pipe, NablaConfig.from_calibration("nabla_calibration.json"))

Means and sums run over every (layer, step) pair; dense layers and steps count as error 0 and kept
fraction 1.0, so the target is the real average work, not the sparse layers' share.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..masks import MaskSpec
from ._calibsolve import Choice, evaluate, per_head_choice, solve
from ._config import NablaConfig
from ._perlayer import CALIBRATION_FORMAT

DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# Per-head thresholds must beat per-layer ones by this share of the error to be worth their cost
# (one mask build per distinct threshold and layer instead of one per layer).
PER_HEAD_GAIN = 0.10


@dataclass
class Calibration:
    """Measured curves and the chosen settings; :meth:`choose` re-solves for another target without
    running the model again, :meth:`save` writes the JSON, :meth:`config` builds the NablaConfig."""

    model: str
    names: list[str]
    candidates: list[MaskSpec]
    steps: list[int]
    err2: torch.Tensor  # [L, S, C, H] squared error sums
    ref2: torch.Tensor  # [L, S, H] squared dense norms
    kept: torch.Tensor  # [L, S, C, H] kept fraction
    target: dict[str, float]
    max_dense_steps: int
    allow_dense_layers: bool
    per_head: bool | None = None  # None: per-head thresholds where they pay (PER_HEAD_GAIN)
    choice: Choice | None = None  # the per-layer choice
    head_options: list[list[int]] | None = None  # per layer and head, when per-head thresholds are used
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, float]:
        """Mean kept fraction and attention error of the settings the file gives (per head or per layer)."""
        assert self.choice is not None
        if self.head_options is not None:
            ph = self.info["per_head"]
            return {"density": ph["density_per_head_thresholds"], "error": ph["error_per_head_thresholds"]}
        return {"density": self.choice.density, "error": self.choice.error}

    @property
    def error(self) -> torch.Tensor:
        """Relative error of each layer's attention output, ``[L, S, C]``."""
        return (self.err2.sum(-1) / self.ref2.sum(-1).clamp_min(1e-30)[:, :, None]).sqrt()

    @property
    def density(self) -> torch.Tensor:
        """Kept fraction per layer, step and candidate, ``[L, S, C]`` (mean over heads)."""
        return self.kept.mean(-1)

    def choose(self, density: float | None = None, error: float | None = None, *, max_dense_steps: int | None = None,
               allow_dense_layers: bool | None = None, per_head: bool | None | str = "same") -> "Calibration":
        """A copy solved for another target (and, optionally, other limits)."""
        _check_target(density, error)
        out = Calibration(**{**self.__dict__, "choice": None, "head_options": None, "info": {}})
        if per_head != "same":
            out.per_head = per_head  # type: ignore[assignment]
        out.target = {"density": density} if density is not None else {"error": error}  # type: ignore[dict-item]
        if max_dense_steps is not None:
            out.max_dense_steps = max_dense_steps
        if allow_dense_layers is not None:
            out.allow_dense_layers = allow_dense_layers
        out._solve()
        return out

    def _solve(self) -> None:
        err, den = self.error, self.density
        self.choice = solve(err, den, density=self.target.get("density"), error=self.target.get("error"),
                            max_dense_steps=self.max_dense_steps, allow_dense_layers=self.allow_dense_layers)
        L, C = len(self.names), len(self.candidates)
        # The best single candidate for the same target and dense steps: what calibration improves on.
        globals_ = [evaluate(err, den, [c] * L, self.choice.dense_steps) for c in range(C)]
        if "density" in self.target:
            fits = [g for g in globals_ if g.density <= self.target["density"] + 1e-9]
            best = min(fits, key=lambda g: g.error) if fits else min(globals_, key=lambda g: g.density)
        else:
            fits = [g for g in globals_ if g.error <= self.target["error"] + 1e-12]
            best = min(fits, key=lambda g: g.density) if fits else min(globals_, key=lambda g: g.error)
        gi = globals_.index(best)
        self.info["global"] = {"candidate": _spec_json(self.candidates[gi]), "density": best.density, "error": best.error}
        self.info["fallback_threshold"] = self.candidates[gi].threshold
        # Per-head thresholds: every head of every layer picks a candidate (no dense layers), at the
        # target density (error target: at the per-layer choice's density), same dense steps.
        self.head_options = None
        if self.err2.shape[-1] > 1 and self.per_head is not False:
            budget = self.target.get("density", self.choice.density)
            try:
                opts, e_head, d_head = per_head_choice(self.err2, self.ref2, self.kept, budget, self.choice.dense_steps)
            except ValueError:
                if self.per_head:
                    raise
            else:
                pays = bool(e_head < (1.0 - PER_HEAD_GAIN) * self.choice.error)
                self.info["per_head"] = {
                    "thresholds": [[self.candidates[o].threshold for o in row] for row in opts],
                    "error_per_layer_thresholds": self.choice.error, "error_per_head_thresholds": e_head,
                    "density_per_head_thresholds": d_head, "pays": pays,
                }
                if self.per_head or (self.per_head is None and pays):
                    self.head_options = opts

    def _per_layer_thresholds(self) -> dict[str, Any]:
        heads, self.head_options = self.head_options, None
        try:
            return self.layer_thresholds()
        finally:
            self.head_options = heads

    def layer_thresholds(self) -> dict[str, Any]:
        """Layer name -> threshold, a list of per-head thresholds, None (dense), or a dict where the
        candidate also has an STA window other than the file's common one."""
        assert self.choice is not None
        common = _common_window(self.candidates)
        out: dict[str, Any] = {}
        if self.head_options is not None:
            for name, row in zip(self.names, self.head_options):
                specs = [self.candidates[o] for o in row]
                thresholds = [sp.threshold for sp in specs]
                out[name] = thresholds if specs[0].sta_window == common else {**_spec_json(specs[0]), "threshold": thresholds}
            return out
        for name, o in zip(self.names, self.choice.options):
            if o < 0:
                out[name] = None
            elif self.candidates[o].sta_window == common:
                out[name] = self.candidates[o].threshold
            else:
                out[name] = _spec_json(self.candidates[o])
        return out

    def to_dict(self, measurements: bool | None = None) -> dict[str, Any]:
        """The JSON content. ``measurements`` (default: when under 20,000 numbers) adds the per-step
        curves so a loaded file can be re-solved for other targets."""
        assert self.choice is not None
        err, den = self.error, self.density
        common = _common_window(self.candidates)
        data: dict[str, Any] = {
            "format": CALIBRATION_FORMAT, "model": self.model, "layers": self.names,
            "query_block": self.candidates[0].query_block, "sta_window": None if common is None else list(common),
            "candidates": [_spec_json(c) for c in self.candidates], "steps_measured": len(self.steps),
            "target": self.target, "max_dense_steps": self.max_dense_steps, "allow_dense_layers": self.allow_dense_layers,
            "per_head_mode": self.per_head,
            "choice": {
                "per_head": self.head_options is not None,
                "layer_thresholds": self.layer_thresholds(), "dense_steps": self.choice.dense_steps,
                "fallback_threshold": self.info.get("fallback_threshold"),
                "density": round(self.chosen["density"], 5), "error": round(self.chosen["error"], 5),
            },
            "per_layer": {"layer_thresholds": self._per_layer_thresholds(), "density": round(self.choice.density, 5),
                          "error": round(self.choice.error, 5)},
            "global": self.info.get("global"), "per_head": self.info.get("per_head"),
            "curves": {  # per layer and candidate, mean over the measured steps
                "density": _round(den.mean(1)), "error": _round(err.mean(1)),
            },
        }
        if measurements or (measurements is None and err.numel() * 2 <= 20000):
            data["measurements"] = {"steps": self.steps, "err2": _round(self.err2), "ref2": _round(self.ref2),
                                    "kept": _round(self.kept)}
        return data

    def save(self, path: str | Path, measurements: bool | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dumps(self.to_dict(measurements)) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """A saved calibration with its measurements (files saved without them cannot be re-solved:
        ``NablaConfig.from_calibration`` reads those)."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != CALIBRATION_FORMAT or "measurements" not in data:
            raise ValueError(f"{path}: not a calibration file with measurements (format {data.get('format')!r})")
        m = data["measurements"]
        t = {k: torch.tensor(m[k], dtype=torch.float64) for k in ("err2", "ref2", "kept")}
        cal = cls(data["model"], data["layers"], [MaskSpec(**_spec_args(c)) for c in data["candidates"]], m["steps"],
                  t["err2"], t["ref2"], t["kept"], data["target"], data["max_dense_steps"], data["allow_dense_layers"],
                  data.get("per_head_mode"))
        cal._solve()
        return cal

    def config(self, **overrides: Any) -> NablaConfig:
        """The NablaConfig of this choice (``overrides``: any other field)."""
        return NablaConfig.from_calibration(self.to_dict(measurements=False), **overrides)

    def summary(self) -> str:
        assert self.choice is not None
        g = self.info["global"]
        c = self.chosen
        lines = [f"calibration of {self.model}: {len(self.names)} layers, {len(self.steps)} steps, "
                 f"{len(self.candidates)} candidates, target {self.target}",
                 f"chosen ({'per head' if self.head_options is not None else 'per layer'}): "
                 f"dense_steps={self.choice.dense_steps}, mean kept {c['density']:.1%}, mean attention error {c['error']:.4f}",
                 f"  (per-layer thresholds: kept {self.choice.density:.1%}, error {self.choice.error:.4f}; best single "
                 f"threshold {g['candidate']['threshold']}: kept {g['density']:.1%}, error {g['error']:.4f})"]
        for name, value in self.layer_thresholds().items():
            lines.append(f"  {name}: {'dense' if value is None else value}")
        ph = self.info.get("per_head")
        if ph and self.head_options is None:
            lines.append(f"per-head thresholds would give error {ph['error_per_head_thresholds']:.4f} vs "
                         f"{ph['error_per_layer_thresholds']:.4f} per layer: {'worth it' if ph['pays'] else 'not used'}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        from ._calibplot import plot_calibration

        return plot_calibration(self, Path(path))


def _dumps(data: Any) -> str:
    """Indented JSON with every list of numbers on one line (the curves stay readable and small)."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s*([-0-9.eE+,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def _check_target(density: float | None, error: float | None) -> None:
    if (density is None) == (error is None):
        raise ValueError("calibrate needs exactly one target: density=<mean kept fraction> or error=<mean relative error>")
    value, name = (density, "density") if density is not None else (error, "error")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"calibrate: {name} must be a number > 0, got {value!r}")
    if name == "density" and value > 1:
        raise ValueError(f"calibrate: density is a kept fraction in (0, 1], got {value!r}")


def _spec_json(spec: MaskSpec) -> dict[str, Any]:
    return {"threshold": spec.threshold, "sta_window": None if spec.sta_window is None else list(spec.sta_window),
            "query_block": spec.query_block}


def _spec_args(d: dict[str, Any]) -> dict[str, Any]:
    return {"threshold": d["threshold"], "sta_window": d.get("sta_window"), "query_block": d.get("query_block", 64)}


def _common_window(candidates: list[MaskSpec]) -> tuple[int, int, int] | None:
    windows = {c.sta_window for c in candidates}
    return next(iter(windows)) if len(windows) == 1 else None


def _round(t: torch.Tensor) -> Any:
    return [float(f"{v:.5g}") for v in t.flatten().tolist()] if t.dim() == 1 else [_round(x) for x in t]


def _candidates(thresholds: Sequence[float], sta_window: Any, query_block: int) -> list[MaskSpec]:
    try:
        values = sorted({float(t) for t in thresholds})
    except (TypeError, ValueError):
        raise ValueError(f"calibrate: thresholds must be numbers in (0, 1], got {thresholds!r}") from None
    if not values:
        raise ValueError("calibrate: thresholds is empty")
    try:
        return [MaskSpec(t, sta_window, query_block) for t in values]
    except ValueError as exc:
        raise ValueError(f"calibrate: {exc}") from None


def _runners(target: Any, inputs: Any) -> list[Callable[[], Any]]:
    """One callable per calibration input: a dict of keyword arguments for ``target`` (a pipeline
    call or a transformer forward), or a callable that runs the denoising itself."""
    if isinstance(inputs, dict) or callable(inputs):
        inputs = [inputs]
    try:
        items = list(inputs)
    except TypeError:
        raise TypeError(f"calibrate: inputs must be a list of dicts (call keyword arguments) or callables, "
                        f"got {type(inputs).__name__}") from None
    if not items:
        raise ValueError("calibrate: inputs is empty; give at least one calibration input")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            out.append(lambda item=item: target(**item))
        elif callable(item):
            out.append(item)
        else:
            raise TypeError(f"calibrate: inputs[{i}] is a {type(item).__name__}; expected a dict of call keyword "
                            "arguments or a callable")
    return out


def calibrate(
    target: Any,
    inputs: Any,
    *,
    density: float | None = None,
    error: float | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    sta_window: Sequence[int] | None = None,
    query_block: int = 64,
    max_dense_steps: int | None = None,
    dense_layers: bool = True,
    per_head: bool | None = None,
    backend: str = "auto",
    query_stride: int = 1,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
) -> Calibration:
    """Measure a diffusers pipeline or transformer on ``inputs`` and choose per-layer thresholds.

    Args:
        target: a pipeline (its ``transformer``) or a transformer that ``apply_nabla`` supports.
        inputs: calibration inputs: dicts of keyword arguments for ``target(...)`` (a pipeline call
            with its prompt and ``num_inference_steps``, or one transformer forward), or callables
            that run the denoising themselves (e.g. a custom sampler). A few prompts and steps suffice.
        density: target mean kept fraction over all (layer, step) pairs; or
        error: target mean relative error of the attention outputs (then the kept fraction is minimised).
        thresholds: the threshold grid every layer chooses from.
        sta_window: an STA window unioned with every candidate (NABLA+STA), or None.
        query_block: 64 or 128, as in NablaConfig.
        max_dense_steps: the most dense first steps to consider (default: a quarter of the measured steps).
        dense_layers: whether a layer may stay dense.
        per_head: one threshold per head (True), per layer (False), or per head where that lowers
            the predicted error by at least 10% (None). Per-head choices keep every layer sparse.
        backend: the ``nabla_attention`` backend that builds the candidate tables.
        query_stride: measure every n-th query token (an unbiased estimate, n times cheaper; the
            dense pass still runs in full).
        out, plot: where to write the JSON file and the PNG of error vs density per layer.
        progress: show a tqdm bar (if tqdm is installed).
    """
    from . import _transformers, apply_nabla, remove_nabla
    from ._calibmeasure import Recorder, install
    from ._core import state_of

    _check_target(density, error)
    candidates = _candidates(thresholds, sta_window, query_block)
    if max_dense_steps is not None and (isinstance(max_dense_steps, bool) or not isinstance(max_dense_steps, int)
                                        or max_dense_steps < 0):
        raise ValueError(f"calibrate: max_dense_steps must be an integer >= 0, got {max_dense_steps!r}")
    models = _transformers(target)
    if len(models) != 1:
        raise ValueError(f"calibrate supports one transformer, this pipeline has {len(models)} (Wan 2.2 A14B's two "
                         "experts share one NablaConfig, whose layer names cannot tell them apart)")
    runners = _runners(target, inputs)
    if isinstance(query_stride, bool) or not isinstance(query_stride, int) or query_stride < 1:
        raise ValueError(f"calibrate: query_stride must be an integer >= 1, got {query_stride!r}")
    recorder = Recorder(candidates, backend, query_stride)
    handle = apply_nabla(models[0], NablaConfig(threshold=1.0, tiling="layer", collect_stats=False, backend=backend))  # type: ignore[arg-type]
    bar: Any = None
    hooks: list[Any] = []
    try:
        state = state_of(models[0])
        assert state is not None
        for layer in state.layers.values():
            install(layer.wrapper, recorder)
        if progress:
            try:
                from tqdm.auto import tqdm

                # One tick per transformer forward (a denoising step, or half of one with unbatched CFG).
                bar = tqdm(desc="calibrating", unit="forward", dynamic_ncols=True)
                def tick(*_: Any) -> None:  # a forward hook's return value would replace the output
                    bar.update(1)

                hooks.append(models[0].register_forward_hook(tick))
            except ImportError:
                bar = None
        with torch.no_grad():
            for i, run in enumerate(runners):  # the step counter restarts by itself when a generation starts over
                if bar is not None:
                    bar.set_postfix(input=f"{i + 1}/{len(runners)}")
                run()
        names = list(state.names)
    finally:
        for hook in hooks:
            hook.remove()
        if bar is not None:
            bar.close()
        remove_nabla(handle)
    err2, ref2, kept, steps = recorder.arrays(names)
    cal = Calibration(type(models[0]).__name__, names, candidates, steps, err2, ref2, kept,
                      {"density": density} if density is not None else {"error": error},  # type: ignore[dict-item]
                      len(steps) // 4 if max_dense_steps is None else int(max_dense_steps), bool(dense_layers),
                      per_head)
    cal._solve()
    if out is not None:
        cal.save(out)
    if plot is not None:
        cal.plot(plot)
    return cal
