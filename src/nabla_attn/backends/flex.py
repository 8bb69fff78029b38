"""Compiled FlexAttention backend.

The block table becomes a FlexAttention ``BlockMask`` *inside* one compiled function (``fullgraph``),
so a new mask at the same shapes is new tensor data, never a new graph (no recompiles when masks
change), and no path can fall back to eager ``flex_attention``, which ignores block lists and would
compute dense attention. The ``mask_mod`` only excludes padding slots; the block lists decide which
blocks are computed. On CUDA, kept blocks with 64 real tokens are passed as *full* blocks (the
kernel skips ``mask_mod`` there) and only edge/text blocks holding padding as partial ones. On CPU
every block is partial: compiled CPU code was seen to fail with full blocks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..grid import BLOCK_TOKENS, TILE, TokenLayout, block_counts_on
from ..masks import BlockSparseMask, compact_rows

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16


def check_supported(q: torch.Tensor, needs_grad: bool = False, query_block: int = 128) -> str | None:
    """Why this backend cannot run ``q`` (None when it can)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (flex supports float16, bfloat16, float32)"
    D = q.shape[-1]
    if D < MIN_HEAD_DIM or D & (D - 1):
        return f"head_dim {D} (flex needs a power of two >= {MIN_HEAD_DIM})"
    if needs_grad and not q.is_cuda:
        return "a backward pass on CPU (FlexAttention has no CPU backward)"
    if needs_grad and query_block == 64:
        # torch 2.11 on H200: Inductor fails to lower this backward ("list indices must be integers").
        return "a backward pass with query_block=64 (its FlexAttention backward fails to compile; use query_block=128)"
    return None


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


def _valid_key_mod(layout: TokenLayout):
    """mask_mod: is key slot ``kv_idx`` a real token? Pure index arithmetic on the grid's constants.

    It captures no tensors: FlexAttention's backward failed to lower with a mask_mod that indexed
    captured buffers (torch 2.11, H200). Which *blocks* are computed is decided by the block lists.
    """
    g = layout.grid
    tr, tc, nv = g.tile_rows, g.tile_cols, layout.num_video_blocks
    last_rows, last_cols = g.height - TILE * (tr - 1), g.width - TILE * (tc - 1)
    text = layout.text_tokens

    def mask_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // BLOCK_TOKENS
        slot = kv_idx % BLOCK_TOKENS
        rows = torch.where((kb // tc) % tr == tr - 1, last_rows, TILE)
        cols = torch.where(kb % tc == tc - 1, last_cols, TILE)
        video_ok = slot < rows * cols
        text_ok = (kb - nv) * BLOCK_TOKENS + slot < text
        return torch.where(kb < nv, video_ok, text_ok)

    return mask_mod


def _flex_impl(q, k, v, kept, counts, scale: float, query_block: int, split_full: bool, layout: TokenLayout, kernel_options):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if not torch.compiler.is_compiling():
        # Eager flex_attention ignores block lists (it would compute dense attention over valid keys).
        raise RuntimeError("the flex backend must run under torch.compile, which is disabled here; use backend='reference'")
    lists = _block_lists(kept, split_full, counts)
    block_mask = BlockMask(
        (q.shape[-2], k.shape[-2]), *lists, BLOCK_SIZE=(query_block, BLOCK_TOKENS), mask_mod=_valid_key_mod(layout)
    )
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


# torch.compile mode for the flex graph; None picks per call: "max-autotune-no-cudagraphs" when a
# backward follows (with 64-token key blocks the default backward config has no valid choice on
# torch 2.11 / H200), the default mode otherwise. Measured by benchmarks/validate_gpu.py.
COMPILE_MODE: str | None = None


def default_kernel_options(query_block: int, needs_grad: bool, is_cuda: bool) -> dict[str, Any]:
    """Tile options that compile on Hopper for our (query_block, 64) sparse blocks."""
    if not is_cuda:
        return {}
    options: dict[str, Any] = {"BLOCK_M": 64, "BLOCK_N": 64} if query_block == 64 else {}
    if needs_grad:
        options.update(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64)
    return options


@functools.lru_cache(maxsize=None)
def _compiled(options: tuple[tuple[str, Any], ...], mode: str | None):
    kernel_options = dict(options) or None
    fn = functools.partial(_flex_impl, kernel_options=kernel_options)
    return torch.compile(fn, dynamic=False, fullgraph=True, mode=mode)


def flex_attention_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    scale: float,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors through compiled FlexAttention."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reason = check_supported(q, needs_grad, mask.query_block)
    if reason is not None:
        raise ValueError(f"flex backend cannot run {reason}; use backend='reference'")
    S = q.shape[-2]
    q_len = mask.num_query_blocks * mask.query_block
    if q_len != S:  # odd number of 64-blocks under 128-token query blocks
        q = torch.nn.functional.pad(q, (0, 0, 0, q_len - S))
    counts = block_counts_on(mask.layout, q.device)
    if kernel_options is None:
        kernel_options = default_kernel_options(mask.query_block, needs_grad, q.is_cuda)
    mode = COMPILE_MODE or ("max-autotune-no-cudagraphs" if needs_grad and q.is_cuda else None)
    options = tuple(sorted(kernel_options.items()))
    out = _compiled(options, mode)(q, k, v, mask.kept, counts, float(scale), mask.query_block, q.is_cuda, mask.layout)
    return out[:, :, :S]
