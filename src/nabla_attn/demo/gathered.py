"""Block-sparse attention by gathering kept key blocks, for CPUs.

The core ``reference`` backend is an oracle: it computes every score and masks, which on a 2-core CPU
is several times slower than dense SDPA. The demo needs a CPU path whose cost falls with the kept
density, so here each query block gathers its kept key blocks (padded to the longest row of its
chunk) and runs PyTorch's fused SDPA on them. Same semantics as :func:`nabla_attn.nabla_attention`
for tables in which every query row keeps at least one block (NABLA, STA and our random masks do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grid import BLOCK_TOKENS
from ..masks import BlockSparseMask

# Gathered key/value elements held at once (x4 bytes each, x2 for k and v).
_CHUNK_ELEMENTS = 1 << 24


def gathered_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                             scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors; returns the same shape."""
    B, H, S, D = q.shape
    layout = mask.layout
    if S != layout.tiled_len:
        raise ValueError(f"gathered_block_attention wants tiled tensors of length {layout.tiled_len}, got {S}")
    qb = mask.query_block
    nb = layout.num_blocks
    nq = mask.num_query_blocks
    counts, idx = mask.expand(B, H).kv_lists()  # [B, H, nq], [B, H, nq, nb]
    valid = layout.valid_tokens(q.device).view(nb, BLOCK_TOKENS)
    # Rows of whole blocks: index_select copies contiguous rows, far faster than an element-wise gather.
    kb = k.reshape(B * H * nb, BLOCK_TOKENS * D)
    vb = v.reshape(B * H * nb, BLOCK_TOKENS * v.shape[-1])
    row_base = (torch.arange(B * H, device=q.device) * nb).view(B * H, 1)
    # Query blocks of 128 tokens cover two 64-token blocks; pad q so it splits evenly.
    q_pad = nq * qb - S
    qp = F.pad(q, (0, 0, 0, q_pad)) if q_pad else q
    qp = qp.reshape(B * H, nq, qb, D)
    counts = counts.reshape(B * H, nq)
    idx = idx.reshape(B * H, nq, nb)

    out = torch.empty(B * H, nq, qb, v.shape[-1], dtype=q.dtype, device=q.device)
    maxc_all = int(counts.max()) if counts.numel() else 0
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * H * maxc_all * BLOCK_TOKENS * D))
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        c = counts[:, start:stop]
        maxc = max(1, int(c.max()))
        ix = idx[:, start:stop, :maxc]  # [BH, r, maxc]; entries past the count are garbage but in range
        slot_ok = torch.arange(maxc, device=q.device).view(1, 1, maxc) < c.unsqueeze(-1)
        r = stop - start
        flat = (ix.reshape(B * H, r * maxc).long() + row_base).reshape(-1)
        kg = kb.index_select(0, flat).view(B * H, r, maxc * BLOCK_TOKENS, D)
        vg = vb.index_select(0, flat).view(B * H, r, maxc * BLOCK_TOKENS, -1)
        key_ok = (valid[ix] & slot_ok.unsqueeze(-1)).view(B * H, r, 1, maxc * BLOCK_TOKENS)
        # An additive float mask keeps SDPA on its fused CPU kernel without a bool->float copy per call.
        bias = torch.zeros(key_ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_ok, float("-inf"))
        out[:, start:stop] = F.scaled_dot_product_attention(qp[:, start:stop], kg, vg, attn_mask=bias, scale=scale)
    return out.reshape(B, H, nq * qb, -1)[:, :, :S]
