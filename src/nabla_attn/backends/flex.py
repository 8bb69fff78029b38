"""Compiled FlexAttention backend.

The block table becomes a FlexAttention ``BlockMask`` *inside* one compiled function (``fullgraph``),
so a new mask at the same shapes is new tensor data, never a new graph (no recompiles when masks
change), and no path can fall back to eager ``flex_attention``, which ignores block lists and would
compute dense attention. The ``mask_mod`` only excludes padding slots; the block lists decide which
blocks are computed. On CUDA, kept blocks with 64 real tokens are passed as *full* blocks (the
kernel skips ``mask_mod`` there) and only edge/text blocks holding padding as partial ones. On CPU
every block is partial: compiled CPU code was seen to fail with full blocks.

On CUDA the mask is the fused GPU builder's (shared with the ``triton`` backend); on the CPU the eager
definition's.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..constants import BLOCK_TOKENS, TILE
from ..grid import TokenLayout
from ..masks import BlockSparseMask, MaskSpec, compact_rows
from .base import Backend, Request
from .fused import GpuMaskBackend, triton_available

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16


def _block_lists(kept: torch.Tensor, split_full: bool, counts: torch.Tensor):
    """kv-side and q-side (count, index) lists, partial and full, for ``BlockMask``'s constructor."""
    if split_full:
        full_cols = counts == BLOCK_TOKENS
        full = kept & full_cols
        partial = kept & ~full_cols
    else:
        full, partial = None, kept
    kv_num, kv_idx = compact_rows(partial)
    q_num, q_idx = compact_rows(partial.transpose(-1, -2))
    if full is None:
        return kv_num, kv_idx, None, None, q_num, q_idx, None, None
    fkv_num, fkv_idx = compact_rows(full)
    fq_num, fq_idx = compact_rows(full.transpose(-1, -2))
    return kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx


def geometry(layout: TokenLayout) -> tuple[int, int, int, int, int, int]:
    """The ints the key mask needs: tile rows and columns, video blocks, the last tile row's and
    column's real extent, text tokens."""
    g = layout.grid
    tr, tc = g.tile_rows, g.tile_cols
    return tr, tc, layout.num_video_blocks, g.height - TILE * (tr - 1), g.width - TILE * (tc - 1), layout.text_tokens


def _valid_key_mod(tr: int, tc: int, nv: int, last_rows: int, last_cols: int, text: int):
    """mask_mod: is key slot ``kv_idx`` a real token? Pure index arithmetic on the layout's ints.

    It captures no tensors: FlexAttention's backward failed to lower with a mask_mod that indexed
    captured buffers (torch 2.11, H200). Which *blocks* are computed is decided by the block lists.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // BLOCK_TOKENS
        slot = kv_idx % BLOCK_TOKENS
        rows = torch.where((kb // tc) % tr == tr - 1, last_rows, TILE)
        cols = torch.where(kb % tc == tc - 1, last_cols, TILE)
        video_ok = slot < rows * cols
        text_ok = (kb - nv) * BLOCK_TOKENS + slot < text
        return torch.where(kb < nv, video_ok, text_ok)

    return mask_mod


def _flex_impl(q, k, v, kept, counts, scale: float, query_block: int, split_full: bool,
               tr: int, tc: int, nv: int, last_rows: int, last_cols: int, text: int, kernel_options):
    # The layout arrives as separate ints so that a new layout recompiles once with symbolic ints
    # (dynamo's automatic dynamic), not once per layout.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if not torch.compiler.is_compiling():
        # Eager flex_attention ignores block lists (it would compute dense attention over valid keys).
        raise RuntimeError("the flex backend must run under torch.compile, which is disabled here; use backend='reference'")
    lists = _block_lists(kept, split_full, counts)
    mask_mod = _valid_key_mod(tr, tc, nv, last_rows, last_cols, text)
    block_mask = BlockMask((q.shape[-2], k.shape[-2]), *lists, BLOCK_SIZE=(query_block, BLOCK_TOKENS), mask_mod=mask_mod)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def default_kernel_options(query_block: int, needs_grad: bool, is_cuda: bool) -> dict[str, Any]:
    """Tile options that compile on Hopper for our (query_block, 64) sparse blocks."""
    if not is_cuda:
        return {}
    options: dict[str, Any] = {"BLOCK_M": 64, "BLOCK_N": 64} if query_block == 64 else {}
    if needs_grad:
        options.update(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64)
    return options


@functools.lru_cache(maxsize=None)
def compiled(options: tuple[tuple[str, Any], ...], mode: str | None) -> Any:
    """The flex graph compiled for these kernel options and mode. ``dynamic=None``: the first call
    specialises, a second token layout recompiles once with dynamic sizes and ints instead of once
    per layout (HunyuanVideo's per-prompt text lengths), so dynamo's recompile limit is never reached."""
    kernel_options = dict(options) or None
    fn = functools.partial(_flex_impl, kernel_options=kernel_options)
    return torch.compile(fn, dynamic=None, fullgraph=True, mode=mode)


class FlexBackend(GpuMaskBackend):
    """Compiled FlexAttention: CUDA (forward and backward; the backward with ``query_block=128``) or
    CPU (forward only)."""

    name = "flex"

    def unsupported(self, req: Request) -> str | None:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no FlexAttention"
        if req.dtype not in SUPPORTED_DTYPES:
            return f"dtype {req.dtype} (flex supports float16, bfloat16, float32)"
        D = req.head_dim
        if D < MIN_HEAD_DIM or D & (D - 1) or req.v_head_dim != D:
            return f"head_dim {D} (flex needs a power of two >= {MIN_HEAD_DIM}, equal for q and v)"
        if req.needs_grad and req.device.type != "cuda":
            return "a backward pass on CPU (FlexAttention has no CPU backward)"
        if req.needs_grad and req.query_block == 64:
            # torch 2.11 on H200: Inductor fails to lower this backward ("list indices must be integers").
            return "a backward pass with query_block=64 (its FlexAttention backward fails to compile; use query_block=128)"
        return None

    def fast_tiling(self, x: torch.Tensor) -> bool:
        return x.is_cuda and triton_available()

    def build_mask(self, qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, spec: MaskSpec,
                   means: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[BlockSparseMask, Any]:
        if qt.is_cuda:
            return super().build_mask(qt, kt, layout, spec, means)
        return Backend.build_mask(self, qt, kt, layout, spec, means)

    def mask_from_means(self, qa: torch.Tensor, ka: torch.Tensor, layout: TokenLayout,
                        spec: MaskSpec) -> tuple[BlockSparseMask, Any]:
        if qa.is_cuda:
            return super().mask_from_means(qa, ka, layout, spec)
        return Backend.mask_from_means(self, qa, ka, layout, spec)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float, kernel_options: dict[str, Any] | None = None) -> torch.Tensor:
        """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors through compiled FlexAttention."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        S = q.shape[-2]
        q_len = mask.num_query_blocks * mask.query_block
        if q_len != S:  # odd number of 64-blocks under 128-token query blocks
            q = torch.nn.functional.pad(q, (0, 0, 0, q_len - S))
        counts = mask.layout.block_counts(q.device)
        if kernel_options is None:
            kernel_options = default_kernel_options(mask.query_block, needs_grad, q.is_cuda)
        # "max-autotune-no-cudagraphs" when a backward follows: with 64-token key blocks the default
        # backward config has no valid choice on torch 2.11 / H200 (benchmarks/validate_gpu.py).
        mode = "max-autotune-no-cudagraphs" if needs_grad and q.is_cuda else None
        options = tuple(sorted(kernel_options.items()))
        out = compiled(options, mode)(q, k, v, mask.kept, counts, float(scale), mask.query_block, q.is_cuda,
                                     *geometry(mask.layout))
        return out[:, :, :S]
