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

import torch
from torch.utils.checkpoint import checkpoint

from typing import Any, Sequence

from ..constants import BLOCK_TOKENS
from ..grid import TokenLayout
from ..masks import BlockSparseMask, compact_rows
from .base import Backend

# Elements of gathered keys or of scores held at once per chunk (x4 bytes in float32).
_CHUNK_ELEMENTS = 1 << 24


def _chunk_attention(
    q: torch.Tensor,  # [B, H, r, qb, D]
    k_blocks: torch.Tensor,  # [B, H, Nb, 64, D]
    v_blocks: torch.Tensor,  # [B, H, Nb, 64, Dv]
    idx: torch.Tensor,  # [B, H, r, kmax] kept key blocks (0 where unused)
    allowed: torch.Tensor,  # [B, H, r, kmax * 64] key slot is kept and real
    scale: float,
) -> torch.Tensor:
    B, H, r, kmax = idx.shape
    qb, D = q.shape[-2:]
    nb = k_blocks.shape[2]
    # One flat index_select per tensor: much faster than broadcast advanced indexing on CPU.
    flat = (idx + nb * torch.arange(B * H, device=idx.device).view(B, H, 1, 1)).reshape(-1)
    keys = k_blocks.reshape(B * H * nb, -1).index_select(0, flat).view(B * H * r, 1, kmax * BLOCK_TOKENS, D)
    values = v_blocks.reshape(B * H * nb, -1).index_select(0, flat).view(B * H * r, 1, kmax * BLOCK_TOKENS, -1)
    # Each query block is its own attention problem over its gathered keys; SDPA's fused kernels
    # do the softmax over kept keys only (the boolean mask) without materialising extra copies.
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B * H * r, 1, qb, D), keys, values, attn_mask=allowed.reshape(B * H * r, 1, 1, -1), scale=scale
    ).view(B, H, r, qb, -1)
    # A row with no kept key at all gives 0 (SDPA gives NaN there); every backend does the same.
    return torch.where(allowed.any(-1)[..., None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _chunk_attention_all_keys(
    q: torch.Tensor,  # [B, H, r, qb, D]
    k: torch.Tensor,  # [B, H, S, D]
    v: torch.Tensor,  # [B, H, S, Dv]
    allowed: torch.Tensor,  # [B, H, r, S] key token is kept and real
    scale: float,
) -> torch.Tensor:
    B, H, r, qb, D = q.shape
    token_mask = allowed.unsqueeze(3).expand(B, H, r, qb, -1).reshape(B, H, r * qb, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B, H, r * qb, D), k, v, attn_mask=token_mask, scale=scale
    ).view(B, H, r, qb, -1)
    return torch.where(allowed.any(-1)[..., None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors; returns ``[B, H, tiled_len, Dv]``."""
    B, H, S, D = q.shape
    Dv = v.shape[-1]
    layout = mask.layout
    nb, qb, nq = layout.num_blocks, mask.query_block, mask.num_query_blocks
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_len = nq * qb
    qc = torch.nn.functional.pad(q.to(compute), (0, 0, 0, q_len - S)).view(B, H, nq, qb, D)
    k_blocks = k.to(compute).view(B, H, nb, BLOCK_TOKENS, D)
    v_blocks = v.to(compute).view(B, H, nb, BLOCK_TOKENS, Dv)

    counts, idx = compact_rows(mask.expand(B, H).kept)
    slot_real = torch.arange(BLOCK_TOKENS, device=q.device) < layout.block_counts(q.device)[:, None]  # [Nb, 64]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    outs = []
    start = 0
    while start < nq:
        # Rows per chunk from this chunk's widest row, so dense text rows do not slow the others.
        kmax = max(1, int(counts[:, :, start : start + 8].max()))
        rows = max(1, _CHUNK_ELEMENTS // (B * H * kmax * BLOCK_TOKENS * max(qb, D)))
        stop = min(nq, start + rows)
        kmax = max(1, int(counts[:, :, start:stop].max()))
        if 2 * kmax > nb:
            # Gathering copies each kept key block once per query block: past half of all keys,
            # masked attention over every key is cheaper (and computes the same softmax).
            allowed = (mask.expand(B, H).kept[:, :, start:stop, :, None] & slot_real).flatten(-2)
            args = (qc[:, :, start:stop], k.to(compute), v.to(compute), allowed, scale)
            fn = _chunk_attention_all_keys
            outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
            start = stop
            continue
        used = torch.arange(kmax, device=q.device) < counts[:, :, start:stop, None]  # [B, H, r, kmax]
        chunk_idx = torch.where(used, idx[:, :, start:stop, :kmax].long(), 0)
        allowed = (used.unsqueeze(-1) & slot_real[chunk_idx]).flatten(-2)
        args = (qc[:, :, start:stop], k_blocks, v_blocks, chunk_idx, allowed, scale)
        outs.append(checkpoint(_chunk_attention, *args, use_reentrant=False) if grad else _chunk_attention(*args))
        start = stop
    out = torch.cat(outs, dim=2).view(B, H, q_len, Dv)[:, :, :S]
    return out.to(q.dtype)


@torch.library.custom_op("nabla_attn::reference_attention", mutates_args=())
def _reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, layout: Sequence[int],
                  query_block: int, scale: float) -> torch.Tensor:
    mask = BlockSparseMask(kept, TokenLayout.from_key(layout), query_block)
    with torch.no_grad():
        return reference_attention(q, k, v, mask, scale).contiguous()


@_reference_op.register_fake
def _(q, k, v, kept, layout, query_block, scale):  # type: ignore[no-untyped-def]
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, kept, ctx.layout, ctx.query_block, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, kept)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    q, k, v, kept = ctx.saved_tensors
    mask = BlockSparseMask(kept, TokenLayout.from_key(ctx.layout), ctx.query_block)
    inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
    with torch.enable_grad():
        out = reference_attention(*inputs, mask, ctx.scale)
    wanted = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return (*(next(grads) if x.requires_grad else None for x in inputs), None, None, None, None)


_reference_op.register_autograd(_backward, setup_context=_setup)


class ReferenceBackend(Backend):
    """Eager PyTorch end to end on any device and dtype: the oracle."""

    name = "reference"
    fallback = "nothing (backend='reference' runs everywhere)"

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float) -> torch.Tensor:
        return _reference_op(q, k, v, mask.kept, mask.layout.key, mask.query_block, scale)
