"""The public op, and the one place that decides how it runs.

Per call, :func:`nabla_attention` validates its arguments once (:class:`~nabla_attn.masks.MaskSpec`,
the tensors, the layout), picks the backend (:func:`select_backend`), and then lets that backend
tile q, k, v (the GPU kernel writes the block means on the way), build the mask (eager or fused),
run attention and untile. Nothing below this module chooses anything.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Literal, Sequence

import torch

from . import backends
from .backends import Backend as _Backend, Request
from .backends.triton import attention_fp8, fp8_unsupported
from .grid import TokenLayout, VideoGrid
from .masks import BlockSparseMask, MaskSpec
from .validation import as_choice, as_float, check_tensors

log = logging.getLogger("nabla_attn")

Backend = Literal["auto", "reference", "flex", "cpu", "triton"]
TokenOrder = Literal["natural", "tiled"]
BACKENDS = backends.NAMES
TOKEN_ORDERS = ("natural", "tiled")
Precision = Literal["bf16", "fp8"]
PRECISIONS = ("bf16", "fp8")


def make_layout(grid: VideoGrid, text_tokens: int = 0, text_position: str = "end") -> TokenLayout:
    if not isinstance(grid, VideoGrid):
        raise TypeError(f"grid must be a nabla_attn.VideoGrid, got {type(grid).__name__}")
    return TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]


def check_sequence(q: torch.Tensor, layout: TokenLayout, token_order: str) -> None:
    """q's sequence length against the layout in natural or tiled order."""
    expected = layout.seq_len if token_order == "natural" else layout.tiled_len
    if q.shape[2] != expected:
        what = layout.describe() if token_order == "natural" else f"tiled length {layout.num_blocks} blocks x 64"
        raise ValueError(f"seq length {q.shape[2]} does not match the grid: expected {expected} ({what})")


def _choose(name: str, req: Request) -> str:
    return _choose_cached(name, req.device, req.dtype, req.head_dim, req.v_head_dim, req.needs_grad, req.query_block)


# A constant under torch.compile: its inputs (device, dtype, sizes, grad mode) are what dynamo guards on.
@torch.compiler.assume_constant_result
def _choose_cached(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, v_head_dim: int,
                   needs_grad: bool, query_block: int) -> str:
    return _choose_uncached(name, device, dtype, head_dim, v_head_dim, needs_grad, query_block)


@functools.lru_cache(maxsize=256)
def _choose_uncached(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, v_head_dim: int,
                     needs_grad: bool, query_block: int) -> str:
    req = Request(device, dtype, head_dim, v_head_dim, needs_grad, query_block)
    if name != "auto":
        be = backends.get(name)
        reason = be.unsupported(req)
        if reason:
            raise ValueError(f"backend={name!r} cannot run {reason}; fallback: {be.fallback}")
        return name
    for candidate in backends.AUTO_ORDER:
        be = backends.get(candidate)
        if be.auto_candidate(req) and be.unsupported(req) is None:
            log.info("nabla_attn: backend='auto' chose %r on %s", candidate, req.device)
            return candidate
    raise ValueError(f"no backend can run {req}")  # unreachable: the reference runs everything


def select_backend(
    q: torch.Tensor,
    backend: str = "auto",
    needs_grad: bool = False,
    query_block: int = 64,
    v_head_dim: int | None = None,
) -> str:
    """The backend :func:`nabla_attention` uses for ``q`` (``auto`` resolved), raising if it cannot run it.

    ``needs_grad``: a backward pass will follow (some backends have none on some devices);
    ``v_head_dim``: v's head_dim where it differs from q's. Decided once per distinct request.
    """
    as_choice("backend", backend, BACKENDS)
    query_block = MaskSpec(1.0, None, query_block).query_block
    req = Request(q.device, q.dtype, q.shape[-1], v_head_dim if v_head_dim is not None else q.shape[-1],
                  bool(needs_grad), query_block)
    return _choose(backend, req)


def _token_order(token_order: str | None, layout: str | None) -> str:
    if layout is not None:
        warnings.warn("nabla_attention(layout=...) is deprecated: use token_order='natural' or 'tiled'",
                      DeprecationWarning, stacklevel=3)
        if token_order is not None and token_order != layout:
            raise ValueError(f"token_order={token_order!r} and the deprecated layout={layout!r} disagree")
        token_order = layout
    token_order = "natural" if token_order is None else token_order
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be 'natural' or 'tiled', got {token_order!r}")
    return token_order


def _check_mask(mask: BlockSparseMask, layout: TokenLayout, q: torch.Tensor, query_block: int | None) -> None:
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    if mask.layout != layout:
        raise ValueError(f"mask was built for {mask.layout}, not {layout}")
    if query_block is not None and query_block != mask.query_block:
        raise ValueError(f"query_block={query_block!r} but the mask has query_block={mask.query_block}; "
                         "leave query_block unset when passing mask=")
    if mask.kept.device != q.device:
        raise ValueError(f"mask is on {mask.kept.device}, q on {q.device}")
    b, h = mask.kept.shape[:2]
    if b not in (1, q.shape[0]) or h not in (1, q.shape[1]):
        raise ValueError(f"mask of batch x heads {b}x{h} cannot serve q of {q.shape[0]}x{q.shape[1]}")


def _tile_qk(be: _Backend, q: torch.Tensor, k: torch.Tensor, lay: TokenLayout,
             pool: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Tiled q and k, and their block means where the backend's tiling writes them (``pool``)."""
    qt, qa = be.tile(q, lay, pool=pool)
    kt, ka = be.tile(k, lay, pool=pool)
    return qt, kt, ((qa, ka) if qa is not None and ka is not None else None)


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
    token_order: TokenOrder | None = None,
    query_block: int | None = None,
    scale: float | None = None,
    return_mask: bool = False,
    layout: TokenOrder | None = None,
    precision: Precision = "bf16",
) -> torch.Tensor | tuple[torch.Tensor, BlockSparseMask]:
    """NABLA attention: exact attention restricted to the block pairs NABLA (and/or STA) keeps.

    Args:
        q, k, v: ``[batch, heads, seq, head_dim]``, tokens in the model's frame-major ``(t, h, w)``
            order with ``text_tokens`` text tokens at ``text_position`` ("end": HunyuanVideo, LTX;
            "start": CogVideoX). ``seq = T*H*W + text_tokens``. v may have another head_dim.
        grid: the latent token grid.
        threshold: kept softmax mass in (0, 1]; 1.0 keeps every block (exact dense attention);
            ``None`` with ``sta_window`` runs pure STA.
        sta_window: ``(wT, wH, wW)`` positive odd window in blocks, unioned with the NABLA mask.
        mask: a precomputed :class:`BlockSparseMask` for this layout, on q's device (then threshold
            and sta_window are not used, and query_block is the mask's).
        backend: "auto" (fastest correct on the device; :func:`select_backend` tells which),
            "triton" (our CUDA kernels), "flex" (compiled FlexAttention), "reference" (eager, any device).
        token_order: "natural" (default) or "tiled": q, k, v already in tiled order
            (:func:`nabla_attn.tile`), ``seq = layout.tiled_len``, and the output stays tiled, so an
            integration can tile once per forward instead of once per layer.
        query_block: 64 (the paper's blocks; default) or 128 (two tiles per query block).
        scale: softmax scale, default ``1/sqrt(head_dim)``; must be finite.
        return_mask: also return the :class:`BlockSparseMask` used.
        layout: deprecated name of ``token_order``.
        precision: "bf16" (default): products in the inputs' dtype. "fp8": forward-only e4m3 Q.K^T
            (per-block scales, smoothed K) on the Triton backend, CUDA sm_89+, float16/bfloat16
            inputs without requires_grad; anything else raises naming it (``docs/fp8.md``).

    Returns:
        Output shaped like ``v`` (in the input's token order, with v's memory layout), and the mask
        if ``return_mask``.

    Non-finite q or k do not raise: a mask row whose block probabilities are not finite keeps every
    block, so NaN reaches the output of the affected queries instead of hiding behind a mask.
    """
    order = _token_order(token_order, layout)
    lay = make_layout(grid, text_tokens, text_position)
    check_tensors(q, k, v)
    check_sequence(q, lay, order)
    if mask is None:
        spec = MaskSpec(threshold, sta_window, 64 if query_block is None else query_block)
        qb = spec.query_block
    else:
        _check_mask(mask, lay, q, query_block)
        qb = mask.query_block
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else as_float("scale", scale)
    if check_precision(precision, backend) == "fp8":
        be: _Backend = _fp8_backend(backend, q, k, v, qb)
    else:
        be = backends.get(_choose(as_choice("backend", backend, BACKENDS), Request.of(q, v, qb)))  # type: ignore[arg-type]
    if order == "tiled":
        qt, kt, vt, means = q, k, v, None
    else:
        qt, kt, means = _tile_qk(be, q, k, lay, pool=mask is None and spec.threshold is not None)
        vt, _ = be.tile(v, lay)
    if mask is None:
        mask, plan = be.build_mask(qt, kt, lay, spec, means)
    else:
        plan = be.plan(mask)
    if precision == "fp8":
        out = attention_fp8(qt, kt, vt, mask, plan, scale)
        if order == "natural":
            out = be.untile(out, lay, like=v)
    elif order == "natural":
        out = be.attention_natural(qt, kt, vt, mask, plan, scale, like=v)
    else:
        out = be.attention(qt, kt, vt, mask, plan, scale)
    return (out, mask) if return_mask else out


def check_precision(precision: str, backend: str) -> str:
    """``precision`` validated against the choices and the backend that runs it (ValueError naming
    both); the one check the op and ``NablaConfig`` share."""
    precision = as_choice("precision", precision, PRECISIONS)
    if precision == "fp8" and as_choice("backend", backend, BACKENDS) not in ("auto", "triton"):
        raise ValueError(f"precision='fp8' runs on backend='triton' only, not backend={backend!r}")
    return precision


def _fp8_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_block: int) -> _Backend:
    """The Triton backend for ``precision="fp8"``, or a ValueError naming what it cannot run."""
    check_precision("fp8", backend)
    reason = fp8_unsupported(q, k, v)
    if reason:
        raise ValueError(f"precision='fp8' cannot run {reason}; use precision='bf16'")
    try:
        _choose("triton", Request.of(q, v, query_block))
    except ValueError as e:
        raise ValueError(f"precision='fp8' needs the triton backend: {e}") from None
    return backends.get("triton")


def nabla_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: VideoGrid,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    text_tokens: int = 0,
    text_position: str = "end",
    *,
    query_block: int = 64,
    backend: Backend = "auto",
    token_order: TokenOrder = "natural",
) -> BlockSparseMask:
    """NABLA's block table (Algorithm 1 of arXiv 2507.13546) for q, k ``[B, H, S, D]``.

    Per batch entry and head: mean-pool q and k over each video block (float32, real tokens only),
    ``P = softmax(qa @ ka^T / sqrt(D))`` over video key blocks, and keep per query block the key
    blocks selected by :func:`~nabla_attn.masks.cdf_keep`. ``sta_window=(wT, wH, wW)`` adds the STA
    window; with ``threshold=None`` the mask is STA alone. Text query blocks keep every block and
    every query keeps the text key blocks. ``query_block=128`` groups two consecutive tiles into one
    query block that keeps the union of their key blocks (a superset of the 64-token mask).

    ``backend`` picks the builder as in :func:`nabla_attention` ("reference": the eager definition;
    on CUDA "auto" runs the fused GPU builder, equal up to float32 rounding at the cut).
    """
    order = _token_order(token_order, None)
    lay = make_layout(grid, text_tokens, text_position)
    check_tensors(q, k, k)
    check_sequence(q, lay, order)
    spec = MaskSpec(threshold, sta_window, query_block)
    be = backends.get(_choose(as_choice("backend", backend, BACKENDS), Request.of(q, k, spec.query_block)))
    with torch.no_grad():
        if order == "tiled":
            qt, kt, means = q, k, None
        else:
            qt, kt, means = _tile_qk(be, q, k, lay, pool=spec.threshold is not None)
        return be.build_mask(qt, kt, lay, spec, means)[0]


def nabla_mask_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    *,
    query_block: int = 64,
    backend: Backend = "auto",
) -> BlockSparseMask:
    """:func:`nabla_mask` on q, k already in tiled order (``[B, H, layout.tiled_len, D]``)."""
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a nabla_attn.TokenLayout, got {type(layout).__name__}")
    return nabla_mask(q, k, layout.grid, threshold, sta_window, layout.text_tokens, layout.text_position,
                      query_block=query_block, backend=backend, token_order="tiled")


def mask_from_means(qa: torch.Tensor, ka: torch.Tensor, layout: TokenLayout, spec: MaskSpec,
                    backend: Backend = "auto") -> BlockSparseMask:
    """NABLA's table from float32 video-block means ``[B, H, num_video_blocks, D]`` of q and k, built
    where the backend builds its masks (the distributed path pools across ranks, then calls this)."""
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a nabla_attn.TokenLayout, got {type(layout).__name__}")
    if not isinstance(spec, MaskSpec):
        raise TypeError(f"spec must be a nabla_attn.MaskSpec, got {type(spec).__name__} ({spec!r})")
    be = backends.get(_choose(as_choice("backend", backend, BACKENDS), Request(
        qa.device, torch.float32, qa.shape[-1], qa.shape[-1], False, spec.query_block)))
    return be.mask_from_means(qa, ka, layout, spec)[0]


def tile(x: torch.Tensor, layout: TokenLayout, dim: int = -2) -> torch.Tensor:
    """Natural -> tiled order along ``dim`` (padding slots are zeros; differentiable; contiguous).
    Where our kernels run (CUDA with Triton) the permutation kernel does it, else the eager gather
    (:func:`nabla_attn.grid.tile`, the same bits)."""
    return backends.get("triton").tile(x, layout, dim=dim)[0]


def untile(x: torch.Tensor, layout: TokenLayout, dim: int = -2, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled -> natural order along ``dim`` (padding dropped; differentiable). ``like``: a tensor of
    the result's shape whose memory layout the result takes (a caller that transposes back then
    gets a free view)."""
    return backends.get("triton").untile(x, layout, like=like, dim=dim)
