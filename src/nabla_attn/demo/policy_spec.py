"""Mask policies written as one string, for the command lines of ``training/finetune.py`` and
``benchmarks/quality_study.py``: ``nabla:THR``, ``nabla+sta:THR:T,H,W``, ``sta:T,H,W``, ``random:P``,
``calibrated:FILE`` (a ``nabla calibrate`` file: per-layer thresholds and dense steps) or ``dense``."""

from __future__ import annotations

from .model import MaskPolicy

SYNTAX = "nabla:THR, nabla+sta:THR:T,H,W, sta:T,H,W, random:P, calibrated:FILE or dense"


def _window(text: str) -> tuple[int, int, int]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 3:
        raise ValueError(f"an STA window is three odd integers T,H,W, got {text!r}")
    return values  # type: ignore[return-value]


def parse_policy(text: str, num_layers: int) -> tuple[MaskPolicy | None, int]:
    """``(policy, dense steps)`` for a policy string; policy None means dense attention. Raises
    ValueError naming the string and the expected syntax."""
    kind, _, rest = text.partition(":")
    try:
        if kind == "dense" and not rest:
            return None, 0
        if kind == "nabla":
            return MaskPolicy("nabla", threshold=float(rest)), 0
        if kind == "nabla+sta":
            thr, win = rest.split(":")
            return MaskPolicy("nabla+sta", threshold=float(thr), sta_window=_window(win)), 0
        if kind == "sta":
            return MaskPolicy("sta", threshold=None, sta_window=_window(rest)), 0
        if kind == "random":
            return MaskPolicy("random", threshold=None, density=float(rest)), 0
        if kind == "calibrated":
            return MaskPolicy.from_calibration(rest, num_layers)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ValueError(f"mask policy {text!r}: {exc}") from None
    raise ValueError(f"mask policy {text!r}: expected {SYNTAX}")
