"""A bounded cache of index tensors per device: the one place such tables are kept.

Index tables (token permutations, block counts, gather maps) are built once on the CPU and copied
to each device on first use. The cache keeps the most recently used entries, so a long-running
process that meets many grids holds a bounded amount of memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

import torch

T = TypeVar("T")


class DeviceCache(Generic[T]):
    """Least-recently-used map from ``(key, device)`` to values built by a factory on a miss."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Hashable, str], T] = OrderedDict()

    def get(self, key: Hashable, device: torch.device | str, make: Callable[[], T]) -> T:
        full = (key, str(torch.device(device)))
        hit = self._entries.get(full)
        if hit is not None:
            self._entries.move_to_end(full)
            return hit
        value = make()
        self._entries[full] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
