"""The public op: validate, tile, build the mask, pick a backend, untile."""

from __future__ import annotations

import logging
import math
from typing import Literal, Sequence

import torch

from .grid import TokenLayout, VideoGrid, tile, tile_pooled, untile
from .masks import BlockSparseMask, check_sta_window, check_threshold, nabla_mask_tiled

log = logging.getLogger("nabla_attn")

Backend = Literal["auto", "reference", "flex", "triton"]
Layout = Literal["natural", "tiled"]
BACKENDS = ("auto", "reference", "flex", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_logged: set[tuple[str, str]] = set()


def make_layout(grid: VideoGrid, text_tokens: int = 0, text_position: str = "end") -> TokenLayout:
    if not isinstance(grid, VideoGrid):
        raise TypeError(f"grid must be a nabla_attn.VideoGrid, got {type(grid).__name__}")
    return TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_name: str = "seq") -> None:
    """Type, rank, shape, dtype and device checks of q, k, v with messages naming the values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, {seq_name}, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(q and k must be equal; v may differ only in head_dim)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, token_layout: str) -> None:
    """:func:`check_tensors`, then the sequence length against the grid and text tokens."""
    check_tensors(q, k, v)
    expected = layout.seq_len if token_layout == "natural" else layout.tiled_len
    if q.shape[2] != expected:
        g = layout.grid
        what = (
            f"{g.frames}x{g.height}x{g.width} = {g.num_tokens} video tokens + {layout.text_tokens} text tokens"
            if token_layout == "natural"
            else f"tiled length {layout.num_blocks} blocks x 64"
        )
        raise ValueError(f"seq length {q.shape[2]} does not match the grid: expected {expected} ({what})")


def _triton_reason(q: torch.Tensor, v_head_dim: int | None) -> str | None:
    from .backends import triton_kernel

    if v_head_dim is not None and v_head_dim != q.shape[-1]:
        return f"v head_dim {v_head_dim} != q head_dim {q.shape[-1]} (the Triton kernel needs them equal)"
    return triton_kernel.check_supported(q)


def select_backend(
    q: torch.Tensor,
    backend: str = "auto",
    needs_grad: bool = False,
    query_block: int = 64,
    v_head_dim: int | None = None,
) -> str:
    """The backend ``nabla_attention`` uses for ``q`` (``auto`` resolved), raising if it cannot run it.

    ``needs_grad``: a backward pass will follow (some backends have none on some devices);
    ``v_head_dim``: v's head_dim where it differs from q's."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from .backends import flex

    if backend == "reference":
        return backend
    if backend == "flex":
        reason = flex.check_supported(q, needs_grad, query_block)
        if reason:
            raise ValueError(f"backend='flex' cannot run {reason}; fallback: backend='reference'")
        return backend
    if backend == "triton":
        reason = _triton_reason(q, v_head_dim)
        if reason:
            raise ValueError(f"backend='triton' cannot run {reason}; fallback: backend='flex' or 'reference'")
        return backend
    # auto: our Triton kernel where it runs, else compiled FlexAttention on CUDA, else the reference.
    if q.is_cuda and _triton_reason(q, v_head_dim) is None:
        choice = "triton"
    elif q.is_cuda and flex.check_supported(q, needs_grad, query_block) is None:
        choice = "flex"
    else:
        choice = "reference"
    key = (str(q.device.type), choice)
    if key not in _logged:
        _logged.add(key)
        log.info("nabla_attn: backend='auto' chose %r on %s", choice, q.device)
    return choice


def run_backend(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> torch.Tensor:
    """Block-sparse attention on tiled tensors with a resolved backend name."""
    if name == "reference":
        from .backends.reference import reference_attention

        return reference_attention(q, k, v, mask, scale)
    if name == "flex":
        from .backends.flex import flex_attention_backend

        return flex_attention_backend(q, k, v, mask, scale)
    if name == "triton":
        from .backends.triton_kernel import triton_attention

        return triton_attention(q, k, v, mask, scale)
    raise ValueError(f"unknown backend {name!r}")


def nabla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: VideoGrid,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    text_tokens: int = 0,
    text_position: str = "end",
    *,
    mask: BlockSparseMask | None = None,
    backend: Backend = "auto",
    layout: Layout = "natural",
    query_block: int = 64,
    scale: float | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, BlockSparseMask]:
    """NABLA attention: exact attention restricted to the block pairs NABLA (and/or STA) keeps.

    Args:
        q, k, v: ``[batch, heads, seq, head_dim]``, tokens in the model's frame-major ``(t, h, w)``
            order with ``text_tokens`` text tokens at ``text_position`` ("end": HunyuanVideo, LTX;
            "start": CogVideoX). ``seq = T*H*W + text_tokens``. With ``layout="tiled"`` they are
            already in tiled order (:func:`nabla_attn.tile`), ``seq = layout.tiled_len``, and the output
            stays tiled: integrations tile once per forward instead of once per layer.
        grid: the latent token grid.
        threshold: kept softmax mass in (0, 1]; 1.0 keeps every block (exact dense attention);
            ``None`` with ``sta_window`` runs pure STA.
        sta_window: ``(wT, wH, wW)`` positive odd window in blocks, unioned with the NABLA mask.
        mask: a precomputed :class:`BlockSparseMask` for this layout (then threshold and sta_window
            are not used).
        backend: "auto" (fastest correct on the device; :func:`select_backend` tells which),
            "triton" (our CUDA kernel), "flex" (compiled FlexAttention), "reference" (eager oracle).
        query_block: 64 (the paper's blocks) or 128 (two tiles per query block; see ``nabla_mask``).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        return_mask: also return the :class:`BlockSparseMask` used.

    Returns:
        Output shaped like ``v`` (in the input's token order), and the mask if ``return_mask``.

    Non-finite q or k do not raise: a mask row whose block probabilities are not finite keeps every
    block, so NaN reaches the output of the affected queries instead of hiding behind a mask.
    """
    lay = make_layout(grid, text_tokens, text_position)
    if layout not in ("natural", "tiled"):
        raise ValueError(f"layout must be 'natural' or 'tiled', got {layout!r}")
    check_qkv(q, k, v, lay, layout)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = select_backend(q, backend, needs_grad, mask.query_block if mask is not None else query_block, v.shape[-1])
    if mask is None:
        check_threshold(threshold)
        check_sta_window(sta_window)
    elif mask.layout != lay:
        raise ValueError(f"mask was built for {mask.layout}, not {lay}")

    means = None
    if layout == "tiled":
        qt, kt, vt = q, k, v
    else:
        # On the GPU the tiling pass also writes the block means the mask needs.
        pool = mask is None and threshold is not None
        qt, qa = tile_pooled(q, lay) if pool else (tile(q, lay), None)
        kt, ka = tile_pooled(k, lay) if pool else (tile(k, lay), None)
        vt = tile(v, lay)
        if qa is not None and ka is not None:
            means = (qa, ka)
    if mask is None:
        mask = nabla_mask_tiled(qt, kt, lay, threshold, sta_window, query_block=query_block, means=means)
    out = run_backend(name, qt, kt, vt, mask, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if layout == "natural":
        # The output takes v's memory layout: [B, S, H, D] callers then transpose back for free.
        out = untile(out, lay, like=v)
    return (out, mask) if return_mask else out
