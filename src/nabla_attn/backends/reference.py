"""Eager block-sparse attention: the oracle every other backend is checked against.

Runs on any device and dtype. Lower-precision inputs are computed in float32 and cast back; float64
stays float64. Where a chunk of query blocks keeps under half the key blocks, each query block
gathers only its kept key blocks, so the cost follows the kept density; denser chunks attend over
all keys with a token mask instead. It works through query blocks in chunks, so no ``S x S`` matrix
ever exists. Under autograd each chunk is recomputed in the
backward pass (activation checkpointing) for the same memory reason.

The backend runs it as one custom op (``nabla_attn::reference_attention``) whose backward recomputes
the forward under autograd, so ``torch.compile`` sees one opaque node; tiling and the mask are the
eager definitions (:mod:`nabla_attn.grid`, :mod:`nabla_attn.masks`) on every device.
"""

from __future__ import annotations

import bisect

import torch
from torch.utils.checkpoint import checkpoint

from typing import Any

from ..constants import BLOCK_TOKENS
from ..masks import BlockSparseMask, compact_rows
from .base import Backend, eager_attention_op

# Elements of gathered keys or of scores held at once per chunk (x4 bytes in float32).
_CHUNK_ELEMENTS = 1 << 24


def _gathered(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, blocks: torch.Tensor,
              allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``r`` query blocks ``q [r, qb, D]`` over their own kept key blocks: ``blocks
    [r, kmax]`` index ``k_blocks [N, 64, D]`` (0 where unused); ``allowed [r, kmax * 64]`` marks the
    key slots that are kept and real."""
    r, qb, D = q.shape
    kmax = blocks.shape[1]
    flat = blocks.reshape(-1)
    keys = k_blocks.index_select(0, flat).view(r, 1, kmax * BLOCK_TOKENS, D)
    values = v_blocks.index_select(0, flat).view(r, 1, kmax * BLOCK_TOKENS, -1)
    # Each query block is its own attention problem over its gathered keys; SDPA's fused kernels
    # do the softmax over kept keys only (the boolean mask) without materialising extra copies.
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(1), keys, values, attn_mask=allowed.view(r, 1, 1, -1), scale=scale
    ).squeeze(1)
    # A row with no kept key at all gives 0 (SDPA gives NaN there); every backend does the same.
    return torch.where(allowed.any(-1)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _all_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``r`` query blocks ``q [r, qb, D]`` of one (batch, head) over all its keys
    ``k [S, D]`` with the token mask ``allowed [r, S]``: cheaper than gathering past half the keys."""
    r, qb, D = q.shape
    token_mask = allowed.unsqueeze(1).expand(r, qb, -1).reshape(1, 1, r * qb, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(1, 1, r * qb, D), k[None, None], v[None, None], attn_mask=token_mask, scale=scale
    ).view(r, qb, -1)
    return torch.where(allowed.any(-1)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _run(fn: Any, grad: bool, *args: Any) -> torch.Tensor:
    return checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors; returns ``[B, H, tiled_len, Dv]``.

    Query blocks of all batch entries and heads are taken in order of their kept-block count, so a
    chunk pads its key lists only to counts alike (dense text rows do not slow the others)."""
    B, H, S, D = q.shape
    Dv = v.shape[-1]
    layout = mask.layout
    nb, qb, nq = layout.num_blocks, mask.query_block, mask.num_query_blocks
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    R = B * H * nq
    qc = torch.nn.functional.pad(q.to(compute), (0, 0, 0, nq * qb - S)).reshape(R, qb, D)
    kc, vc = k.to(compute).reshape(B * H, nb * BLOCK_TOKENS, D), v.to(compute).reshape(B * H, nb * BLOCK_TOKENS, Dv)
    k_blocks, v_blocks = kc.reshape(B * H * nb, BLOCK_TOKENS, D), vc.reshape(B * H * nb, BLOCK_TOKENS, Dv)
    kept = mask.expand(B, H).kept.reshape(R, nb)
    counts, idx = compact_rows(kept)
    slot_real = torch.arange(BLOCK_TOKENS, device=q.device) < layout.block_counts(q.device)[:, None]  # [Nb, 64]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()
    first = bisect.bisect_right(sorted_counts, 0)  # rows keeping nothing stay 0
    # Gathering copies each kept key block once per query block: past half of all keys, masked
    # attention over every key of the row's (batch, head) is cheaper (and the same softmax).
    dense_from = bisect.bisect_right(sorted_counts, nb // 2)
    rows_out: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    start = first
    while start < dense_from:
        kmax = sorted_counts[start]
        stop = start + 1
        while stop < dense_from and (stop + 1 - start) * sorted_counts[stop] * BLOCK_TOKENS * max(qb, D) <= _CHUNK_ELEMENTS:
            stop += 1
        rows = order[start:stop]
        kmax = sorted_counts[stop - 1]
        used = torch.arange(kmax, device=q.device) < counts[rows, None]  # [r, kmax]
        blocks = torch.where(used, idx[rows, :kmax].long(), 0)
        allowed = (used.unsqueeze(-1) & slot_real[blocks]).flatten(-2)
        global_blocks = blocks + (rows // nq * nb)[:, None]
        rows_out.append(rows)
        outs.append(_run(_gathered, grad, qc[rows], k_blocks, v_blocks, global_blocks, allowed, scale))
        start = stop
    dense = order[dense_from:]
    for bh in torch.unique(dense // nq).tolist():
        rows = dense[dense // nq == bh]
        allowed = (kept[rows].unsqueeze(-1) & slot_real).flatten(-2)
        rows_out.append(rows)
        outs.append(_run(_all_keys, grad, qc[rows], kc[bh], vc[bh], allowed, scale))
    out = qc.new_zeros(R, qb, Dv)
    if outs:
        out = out.index_copy(0, torch.cat(rows_out), torch.cat(outs))
    return out.view(B, H, nq * qb, Dv)[:, :, :S].to(q.dtype)


_reference_op = eager_attention_op("nabla_attn::reference_attention", reference_attention)


class ReferenceBackend(Backend):
    """Eager PyTorch end to end on any device and dtype: the oracle."""

    name = "reference"
    fallback = "nothing (backend='reference' runs everywhere)"

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float) -> torch.Tensor:
        return _reference_op(q, k, v, mask.kept, mask.layout.key, mask.query_block, scale)
