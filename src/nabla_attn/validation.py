"""Argument checks shared by every layer, with messages that name the values.

Numbers accept any real or integral type (Python, numpy, 0-d tensors are not numbers) except bool.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers included), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {out}")
    return out


def as_float(name: str, value: object) -> float:
    """``value`` as a finite Python float (numpy floats and ints included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out!r}")
    return out


def as_choice(name: str, value: object, choices: Sequence[object]) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_name: str = "seq") -> None:
    """Type, rank, shape, dtype and device of q, k, v ``[batch, heads, seq, head_dim]``.

    q and k must match exactly; v may differ in head_dim. Every size must be at least 1.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, {seq_name}, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(q and k must be equal; v may differ only in head_dim)"
        )
    empty = [name for name, size in zip(("batch", "heads", "head_dim"), (q.shape[0], q.shape[1], q.shape[3])) if size == 0]
    if empty or v.shape[3] == 0:
        raise ValueError(f"q, k, v must have at least one {', '.join(empty) or 'v head_dim'}: "
                         f"q {tuple(q.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def token_dim(x: torch.Tensor, dim: int) -> int:
    """``dim`` of ``x`` as a non-negative index, raising for a 0-d tensor or a dim out of range."""
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    return dim % x.dim()
