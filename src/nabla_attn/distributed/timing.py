"""Optional phase timing for the Ulysses op (CUDA events on GPU, wall clock on CPU)."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Records named phases of one or more calls; :meth:`totals` gives milliseconds per phase.

    On CUDA the marks are events on the current stream, so timing adds no synchronisation until
    :meth:`totals` is called. Pass one to ``ulysses_nabla_attention(..., timer=...)``.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else None
        self.cuda = dev is not None and dev.type == "cuda"
        self._spans: list[tuple[str, object, object]] = []
        self._open: tuple[str, object] | None = None

    def _mark(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name: str) -> None:
        """Close the open phase (if any) and open ``name``."""
        mark = self._mark()
        if self._open is not None:
            self._spans.append((self._open[0], self._open[1], mark))
        self._open = (name, mark)

    def stop(self) -> None:
        if self._open is not None:
            self._spans.append((self._open[0], self._open[1], self._mark()))
            self._open = None

    def totals(self) -> dict[str, float]:
        """Milliseconds per phase name, summed over all recorded spans (synchronises CUDA)."""
        self.stop()
        out: dict[str, float] = defaultdict(float)
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        for name, a, b in self._spans:
            if self.cuda:
                out[name] += a.elapsed_time(b)  # type: ignore[attr-defined]
            else:
                out[name] += (b - a) * 1e3  # type: ignore[operator]
        return dict(out)

    def reset(self) -> None:
        self._spans.clear()
        self._open = None
