"""Compiled FlexAttention backend.

The block table becomes a FlexAttention ``BlockMask`` *inside* one compiled function, so a new mask at
the same shapes is new tensor data, never a new graph (no recompiles when masks change). Its
``mask_mod`` reads the block table and the per-block token counts, so the op means the same on every
path: eager ``flex_attention`` (which would ignore the block lists under a no-op ``mask_mod`` and
compute dense attention) still computes exactly the table. On CUDA, kept blocks with 64 real tokens
are passed as *full* blocks (the kernel skips ``mask_mod`` there) and only edge/text blocks holding
padding as partial ones. On CPU every block is partial: compiled CPU code was seen to fail with
full blocks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..grid import BLOCK_TOKENS, block_counts_on
from ..masks import BlockSparseMask, compact_rows

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16


def check_supported(q: torch.Tensor) -> str | None:
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


def _flex_impl(q, k, v, kept, counts, scale: float, query_block: int, split_full: bool, kernel_options):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    batch_bcast = kept.shape[0] == 1
    head_bcast = kept.shape[1] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // BLOCK_TOKENS
        row = kept[0 if batch_bcast else b, 0 if head_bcast else h, q_idx // query_block, kb]
        return row & ((kv_idx % BLOCK_TOKENS) < counts[kb])

    lists = _block_lists(kept, split_full, counts)
    block_mask = BlockMask(
        (q.shape[-2], k.shape[-2]), *lists, BLOCK_SIZE=(query_block, BLOCK_TOKENS), mask_mod=mask_mod
    )
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


@functools.lru_cache(maxsize=None)
def _compiled(options: tuple[tuple[str, Any], ...]):
    kernel_options = dict(options) or None
    fn = functools.partial(_flex_impl, kernel_options=kernel_options)
    return torch.compile(fn, dynamic=False, fullgraph=True)


def flex_attention_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    scale: float,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors through compiled FlexAttention."""
    reason = check_supported(q)
    if reason is not None:
        raise ValueError(f"flex backend cannot run {reason}; use backend='reference'")
    S = q.shape[-2]
    q_len = mask.num_query_blocks * mask.query_block
    if q_len != S:  # odd number of 64-blocks under 128-token query blocks
        q = torch.nn.functional.pad(q, (0, 0, 0, q_len - S))
    counts = block_counts_on(mask.layout, q.device)
    options = tuple(sorted((kernel_options or {}).items()))
    out = _compiled(options)(q, k, v, mask.kept, counts, float(scale), mask.query_block, q.is_cuda)
    return out[:, :, :S]
