"""Eager block-sparse attention: the oracle every other backend is checked against.

Runs on any device and dtype. Lower-precision inputs are computed in float32 and cast back; float64
stays float64. Queries are processed in chunks so no ``S x S`` matrix exists at once; under autograd
each chunk is recomputed in the backward pass (activation checkpointing) for the same reason.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..grid import BLOCK_TOKENS
from ..masks import BlockSparseMask

# Scores held at once per chunk, in elements (x4 bytes in float32).
_CHUNK_ELEMENTS = 1 << 25


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with no kept key at all gives 0 (softmax of all -inf is NaN); the flex backend does the same.
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ v


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors; returns the same shape."""
    B, H, S, D = q.shape
    layout = mask.layout
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    kept = mask.expand(B, H).kept
    valid_keys = layout.valid_tokens(q.device)  # [S]

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * S * mask.query_block))
    outs = []
    nq = mask.num_query_blocks
    for start in range(0, nq, rows_per_chunk):
        stop = min(nq, start + rows_per_chunk)
        tok0, tok1 = start * mask.query_block, min(S, stop * mask.query_block)
        block_rows = kept[:, :, start:stop]  # [B, H, r, Kb]
        allowed = block_rows.repeat_interleave(mask.query_block, dim=2)[:, :, : tok1 - tok0]
        allowed = allowed.repeat_interleave(BLOCK_TOKENS, dim=3) & valid_keys
        args = (qc[:, :, tok0:tok1], kc, vc, allowed, scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            outs.append(checkpoint(_chunk_attention, *args, use_reentrant=False))
        else:
            outs.append(_chunk_attention(*args))
    return torch.cat(outs, dim=2).to(q.dtype)
