"""Block-sparse attention for the CPU: each query block's kept keys gathered, chunk by chunk, into
one reused buffer, one SDPA call per chunk.

The eager reference (``backends/reference.py``) is the definition and stays simple. On a CPU some
of its choices cost about as much as the attention they save (measured on 2 cores: docs/benchmarks.md,
"CPU"); this backend computes the same thing differently:

- The reference gathers up to 2^24 elements per chunk into fresh tensors, and an allocation that
  large is mapped and page-faulted in anew on every call, which costs more than the copy itself.
  Here one buffer of at most :data:`CHUNK_ELEMENTS`, small enough for the allocator to recycle,
  takes every chunk of a call, K and V together in one ``index_select`` (they are concatenated per
  token once).
- Rows keeping over half the key blocks attend there over all keys with a full ``[queries, keys]``
  token mask, which SDPA's CPU kernel reads for every score. Here every row gathers, and the only
  mask is a key-only ``[rows, 1, 1, keys]`` one (broadcast over queries) for chunks of uneven rows.
- Padding slots of edge blocks (a grid side not divisible by 8) are computed and masked there. Here
  only real keys are gathered, and queries past a query block's last real token are not computed
  (their outputs are 0; padding slots have no defined output).
- Chunks gather their query rows and scatter their outputs there; here that happens once per call.

Rows (all batch entries and heads together) are sorted by query length and then by real-key count,
so a chunk pads its key lists only to lengths alike. A padded key slot repeats the row's first key
and is masked, so a non-finite key reaches only rows that keep its block. The result is the
reference's softmax over the same keys; only the order of float additions differs.

Autograd: the op's backward recomputes the chunks with differentiable gathers, each chunk
checkpointed (as the reference does), so no gathered copy outlives its chunk. Like the reference's,
that backward is eager Python (``torch.compile`` traces the forward op, not into its backward).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..constants import BLOCK_TOKENS
from ..grid import TokenLayout
from ..masks import BlockSparseMask, compact_rows
from .base import Backend, Request, eager_attention_op

# Gathered K and V elements per chunk (x4 bytes in float32). Small enough that the allocator
# recycles the buffer between calls, large enough that a call makes few parallel regions.
CHUNK_ELEMENTS = 1 << 22
# Where backend="auto" takes this backend: the requests its benchmark measured faster than the reference.
AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def chunks(lengths: Sequence[int], groups: Sequence[int], start: int, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` ranges of rows sorted by (group, key length), one group each, whose
    gathered keys (rows x the longest) fit ``tokens_per_chunk``; a longer row is a chunk alone."""
    out = []
    n = len(lengths)
    while start < n:
        stop = start + 1
        while (stop < n and groups[stop] == groups[start]
               and (stop + 1 - start) * lengths[stop] <= tokens_per_chunk):
            stop += 1
        out.append((start, stop))
        start = stop
    return out


def query_lengths(layout: TokenLayout, query_block: int, device: torch.device) -> torch.Tensor:
    """Per query block, its slots up to the last real query (int64 ``[Qb]``): later slots are padding."""
    counts = layout.block_counts(device).long()
    if query_block == BLOCK_TOKENS:
        return counts
    pairs = torch.nn.functional.pad(counts, (0, (-len(counts)) % 2)).view(-1, 2)
    return torch.where(pairs[:, 1] > 0, BLOCK_TOKENS + pairs[:, 1], pairs[:, 0])


def _chunk(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor | None, D: int, scale: float) -> torch.Tensor:
    """SDPA of ``r`` query blocks ``q [r, n, D]`` over their own gathered keys and values ``kv [r, L, D + Dv]``."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(1), kv[..., :D].unsqueeze(1), kv[..., D:].unsqueeze(1), attn_mask=allowed, scale=scale)
    return out.squeeze(1)


def _gather_chunk(q: torch.Tensor, kv_tokens: torch.Tensor, index: torch.Tensor, allowed: torch.Tensor | None,
                  D: int, scale: float) -> torch.Tensor:
    """:func:`_chunk` on freshly gathered keys (differentiable: the backward's recomputation)."""
    return _chunk(q, kv_tokens[index], allowed, D, scale)


def _key_index(blocks: torch.Tensor, used: torch.Tensor, slot_real: torch.Tensor, first_slot: torch.Tensor,
               length: int) -> torch.Tensor:
    """Rows of the token table each row's keys come from: its kept blocks' real slots packed to the
    front of ``[r, length]``, the rest repeating its first key (masked)."""
    r = blocks.shape[0]
    real = (slot_real[blocks] & used[:, :, None]).view(r, -1)
    slots = (first_slot[:, :, None] + torch.arange(BLOCK_TOKENS, device=blocks.device)).view(r, -1)
    if real.all() and slots.shape[1] == length:
        return slots
    # Real slots go to their running position; the others to a spare last column that is cut off.
    pos = torch.where(real, real.cumsum(1) - 1, length)
    index = slots[:, :1].expand(r, length + 1).clone()
    return index.scatter_(1, pos, slots)[:, :length]


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float,
                  chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors; returns ``[B, H, tiled_len, Dv]``
    (padding query slots have no defined output: 0 where a query block ends in padding).

    Lower-precision inputs are computed in float32 and cast back; float64 stays float64. Differentiable
    in q, k, v (then each chunk gathers afresh and is checkpointed)."""
    B, H, S, D = q.shape
    Dv = v.shape[-1]
    layout = mask.layout
    nb, qb, nq = layout.num_blocks, mask.query_block, mask.num_query_blocks
    dev = q.device
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    R = B * H * nq
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    kept = mask.expand(B, H).kept.reshape(R, nb)
    counts, idx = compact_rows(kept)
    block_counts = layout.block_counts(dev)
    key_len = (kept * block_counts).sum(-1)  # real keys per row
    q_len = query_lengths(layout, qb, dev).repeat(B * H)
    # Rows keeping nothing first (they stay 0), then by query length, then by key length.
    order = torch.argsort(torch.where(key_len > 0, q_len * (S + 1) + key_len, -1), stable=True)
    sorted_keys, sorted_q = key_len[order].tolist(), q_len[order].tolist()
    first = int((key_len == 0).sum())
    out = q.new_zeros(R, qb, Dv, dtype=compute)
    if first == R:
        return out.view(B, H, nq * qb, Dv)[:, :, :S].to(q.dtype)

    rows = order[first:]
    qc = q.to(compute)
    if nq * qb != S:  # an odd number of 64-token blocks under 128-token query blocks
        qc = torch.nn.functional.pad(qc, (0, 0, 0, nq * qb - S))
    q_rows = qc.reshape(R, qb, D).index_select(0, rows)
    kv_tokens = torch.cat([k.to(compute), v.to(compute)], dim=-1).view(B * H * S, D + Dv)
    slot_real = torch.arange(BLOCK_TOKENS, device=dev) < block_counts[:, None]  # [Nb, 64]
    row_base = (torch.arange(R, device=dev) // nq * nb)[:, None]
    idx = idx.long()

    spans = chunks(sorted_keys, sorted_q, first, max(chunk_elements // (D + Dv), 1))
    largest = max((stop - start) * sorted_keys[stop - 1] for start, stop in spans)
    buffer = None if grad else q_rows.new_empty(largest, D + Dv)
    outs = []
    for start, stop in spans:
        chunk_rows = order[start:stop]
        length, n_q = sorted_keys[stop - 1], sorted_q[start]
        kmax = int(counts[chunk_rows].max())
        blocks = idx[chunk_rows, :kmax]
        used = torch.arange(kmax, device=dev) < counts[chunk_rows, None]
        first_slot = (torch.where(used, blocks, blocks[:, :1]) + row_base[chunk_rows]) * BLOCK_TOKENS
        index = _key_index(blocks, used, slot_real, first_slot, length)
        allowed = None
        if sorted_keys[start] != length:
            allowed = (torch.arange(length, device=dev) < key_len[chunk_rows, None]).view(-1, 1, 1, length)
        q_chunk = q_rows[start - first : stop - first, :n_q]
        if grad:
            o = checkpoint(_gather_chunk, q_chunk, kv_tokens, index, allowed, D, scale, use_reentrant=False)
        else:
            assert buffer is not None
            kv = torch.index_select(kv_tokens, 0, index.reshape(-1), out=buffer[: index.numel()])
            o = _chunk(q_chunk, kv.view(stop - start, length, D + Dv), allowed, D, scale)
        outs.append(torch.nn.functional.pad(o, (0, 0, 0, qb - n_q)) if n_q < qb else o)
    out = out.index_copy(0, rows, torch.cat(outs))
    return out.view(B, H, nq * qb, Dv)[:, :, :S].to(q.dtype)


_cpu_op = eager_attention_op("nabla_attn::cpu_attention", cpu_attention)


class CpuBackend(Backend):
    """Gathered block-sparse attention on CPU tensors (forward and backward); eager tiling and mask."""

    name = "cpu"
    fallback = "backend='reference'"

    def unsupported(self, req: Request) -> str | None:
        if req.device.type != "cpu":
            return f"tensors on {req.device} (it runs CPU tensors)"
        return None

    def auto_candidate(self, req: Request) -> bool:
        return (req.device.type == "cpu" and req.dtype in AUTO_DTYPES and not req.needs_grad
                and req.v_head_dim == req.head_dim)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float) -> torch.Tensor:
        return _cpu_op(q, k, v, mask.kept, mask.layout.key, mask.query_block, scale)
