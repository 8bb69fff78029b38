"""Sizes past 2^31 elements: batch 8 at the Wan 14B 720p shape (40 heads, 21x40x80 tokens, head_dim
128, bf16: 2.75e9 elements per tensor). Every batch entry must come out exactly as when it runs
alone, forward and backward, for both query blocks, and the mask from pre-tiled input too (the
pooling kernel). Needs about 90 GB of GPU memory."""

from __future__ import annotations

import gc

import pytest
import torch

from nabla_attn import VideoGrid, nabla_attention, nabla_mask, tile
from nabla_attn.grid import TokenLayout

GRID = VideoGrid(21, 40, 80)
B, H, D = 8, 40, 128


def _enough_memory() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 120 * 2**30


@pytest.mark.skipif(not _enough_memory(), reason="needs a GPU with more than 120 GiB (an H200)")
@pytest.mark.parametrize("query_block", [64, 128])
def test_batch_8_wan_720p_past_2_31_elements(query_block: int) -> None:
    torch.manual_seed(0)
    shape = (B, H, GRID.num_tokens, D)
    assert torch.Size(shape).numel() > 2**31
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    out, mask = nabla_attention(q, k, v, GRID, 0.1, query_block=query_block, return_mask=True)
    assert 0.02 < mask.density < 0.5
    out.backward(dout)
    for b in (0, B - 1):
        qb, kb, vb = (x[b : b + 1].detach().clone().requires_grad_() for x in (q, k, v))
        ob, mb = nabla_attention(qb, kb, vb, GRID, 0.1, query_block=query_block, return_mask=True)
        ob.backward(dout[b : b + 1])
        assert torch.equal(mb.kept[0], mask.kept[b]), f"entry {b}: mask differs"
        assert torch.equal(ob[0], out[b]), f"entry {b}: output differs, max {float((ob[0] - out[b]).abs().max())}"
        for name, big, small in (("dq", q.grad, qb.grad), ("dk", k.grad, kb.grad), ("dv", v.grad, vb.grad)):
            assert torch.equal(small[0], big[b]), f"entry {b}: {name} differs"
    del out, dout
    # The mask from pre-tiled q and k reads them with the pooling kernel (offsets past 2^31 too).
    layout = TokenLayout(GRID)
    with torch.no_grad():
        qt, kt = tile(q.detach(), layout), tile(k.detach(), layout)
        q.grad = k.grad = v.grad = None
        del v
        gc.collect()
        tiled_mask = nabla_mask(qt, kt, GRID, 0.1, query_block=query_block, token_order="tiled")
        last = nabla_mask(qt[B - 1 :], kt[B - 1 :], GRID, 0.1, query_block=query_block, token_order="tiled")
    assert torch.equal(last.kept[0], tiled_mask.kept[B - 1])
    assert torch.equal(tiled_mask.kept, mask.kept)
