"""Block-sparse attention backends and their registry.

Each backend (:class:`~nabla_attn.backends.base.Backend`) says what it supports, tiles and builds
its mask on its device, and runs attention on tiled q, k, v; none knows about models:

- ``triton``: our kernels on CUDA (Triton; the warp-specialised Gluon forward on Hopper), the fused
  GPU mask builder and the tiling kernel;
- ``flex``: compiled FlexAttention (CUDA; CPU forward), the GPU mask builder on CUDA;
- ``cpu``: gathered block-sparse attention on CPU tensors, the eager tiling and mask (``auto`` takes
  it where ``benchmarks/bench_cpu.py`` measured it faster than the reference: CPU forward passes in
  float32, float16, bfloat16);
- ``reference``: eager PyTorch end to end on any device, the oracle.

``backend="auto"`` takes the first backend in :data:`AUTO_ORDER` that considers the device and can
run the call. :func:`nabla_attn.attention.select_backend` is the one place that decides.
"""

from __future__ import annotations

from .base import Backend, Request
from .cpu import CpuBackend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

_REGISTRY: dict[str, Backend] = {
    b.name: b for b in (TritonBackend(), FlexBackend(), CpuBackend(), ReferenceBackend())
}
AUTO_ORDER = ("triton", "flex", "cpu", "reference")
NAMES = ("auto", *_REGISTRY)


def get(name: str) -> Backend:
    """The registered backend called ``name`` ("triton", "flex", "cpu", "reference")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}") from None


__all__ = ["AUTO_ORDER", "Backend", "NAMES", "Request", "get"]
