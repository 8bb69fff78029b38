import math

import pytest
import torch

from nabla_attn import BlockSparseMask, VideoGrid, cdf_keep, nabla_mask, sta_mask

GRID = VideoGrid(3, 13, 22)  # tiles 2 x 3, edge tiles 5 rows / 6 cols: not divisible by 8


def paper_mask(q, k, grid, threshold, text_tokens=0, text_position="end"):
    """Algorithm 1 written from the paper with explicit loops, float64, natural token order."""
    B, H, S, D = q.shape
    T, Hh, W = grid.frames, grid.height, grid.width
    off = text_tokens if text_position == "start" else 0
    blocks = []
    for t in range(T):
        for i in range(0, Hh, 8):
            for j in range(0, W, 8):
                blocks.append([off + t * Hh * W + h * W + w for h in range(i, min(i + 8, Hh)) for w in range(j, min(j + 8, W))])
    nv = len(blocks)
    nt = -(-text_tokens // 64)
    kept = torch.ones(B, H, nv + nt, nv + nt, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            qa = torch.stack([q[b, h, idx].double().mean(0) for idx in blocks])
            ka = torch.stack([k[b, h, idx].double().mean(0) for idx in blocks])
            p = torch.softmax(qa @ ka.T / math.sqrt(D), -1)
            for r in range(nv):
                vals, order = torch.sort(p[r])
                cum = torch.cumsum(vals, 0)
                row = torch.zeros(nv, dtype=torch.bool)
                row[order[cum >= 1 - threshold]] = True
                kept[b, h, r, :nv] = row
    return kept


@pytest.mark.parametrize("text,pos", [(0, "end"), (7, "end"), (7, "start")])
@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.95])
def test_nabla_mask_matches_paper(text, pos, threshold):
    S = GRID.num_tokens + text
    q, k = torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)
    q = q + 2.0 * torch.randn(2, 2, 1, 16)  # structure: block maps far from uniform
    m = nabla_mask(q, k, GRID, threshold=threshold, text_tokens=text, text_position=pos)
    ref = paper_mask(q, k, GRID, threshold, text, pos)
    assert m.dense().shape == ref.shape
    assert torch.equal(m.dense(), ref)
    assert 0 < m.density <= 1
    # batch entries and heads really differ
    assert not torch.equal(m.dense()[0], m.dense()[1])


def test_threshold_one_keeps_everything_and_density_monotone():
    S = GRID.num_tokens
    q, k = torch.randn(1, 4, S, 16) * 3, torch.randn(1, 4, S, 16) * 3
    assert nabla_mask(q, k, GRID, threshold=1.0).dense().all()
    dens = [nabla_mask(q, k, GRID, threshold=t).density for t in (0.1, 0.4, 0.7, 0.9, 1.0)]
    assert dens == sorted(dens) and dens[0] < dens[-1] == 1.0
    # every row keeps at least one block
    assert nabla_mask(q, k, GRID, threshold=0.01).dense().any(-1).all()


def test_cdf_keep_ties_kept_together():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    keep = cdf_keep(p, 0.5)
    assert keep[0].all()  # any two of the tied blocks would do: all four are kept, order-free
    assert keep[1].tolist() == [False, False, True, True]


def test_nonfinite_rows_keep_all_blocks():
    S = GRID.num_tokens
    q, k = torch.randn(1, 1, S, 16), torch.randn(1, 1, S, 16)
    q[0, 0, 5] = float("nan")  # token 5 lies in block 0
    m = nabla_mask(q, k, GRID, threshold=0.2)
    assert m.dense()[0, 0, 0].all()
    assert not m.dense()[0, 0, 1].all()


def brute_sta(grid, window):
    T, R, C = grid.block_grid
    coords = [(t, r, c) for t in range(T) for r in range(R) for c in range(C)]
    out = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for a, (t, r, c) in enumerate(coords):
        for b, (t2, r2, c2) in enumerate(coords):
            out[a, b] = abs(t - t2) <= window[0] // 2 and abs(r - r2) <= window[1] // 2 and abs(c - c2) <= window[2] // 2
    return out


@pytest.mark.parametrize("window", [(1, 1, 1), (3, 1, 3), (5, 3, 1)])
def test_sta_mask_matches_brute_force(window):
    grid = VideoGrid(5, 20, 30)
    m = sta_mask(grid, window)
    assert m.dense().shape == (1, 1, grid.num_blocks, grid.num_blocks)
    assert torch.equal(m.dense()[0, 0], brute_sta(grid, window))


def test_sta_with_text_and_hybrid_union():
    S = GRID.num_tokens + 70
    q, k = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    sta = sta_mask(GRID, (1, 3, 3), text_tokens=70)
    nv = GRID.num_blocks
    assert sta.dense()[0, 0, nv:].all() and sta.dense()[0, 0, :, nv:].all()
    only = nabla_mask(q, k, GRID, threshold=0.3, text_tokens=70)
    hybrid = nabla_mask(q, k, GRID, threshold=0.3, sta_window=(1, 3, 3), text_tokens=70)
    assert torch.equal(hybrid.dense(), only.dense() | sta.dense())
    pure = nabla_mask(q, k, GRID, threshold=None, sta_window=(1, 3, 3), text_tokens=70)
    assert torch.equal(pure.dense(), sta.dense())


def test_query_block_128_is_union_of_tile_pairs():
    S = GRID.num_tokens
    q, k = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    m64 = nabla_mask(q, k, GRID, threshold=0.5)
    m128 = nabla_mask(q, k, GRID, threshold=0.5, query_block=128)
    d64 = m64.dense()
    assert m128.dense().shape[2] == math.ceil(d64.shape[2] / 2)  # 18 tiles -> 9 query blocks
    assert torch.equal(m128.dense()[:, :, 0], d64[:, :, 0] | d64[:, :, 1])
    assert torch.equal(m128.dense()[:, :, -1], d64[:, :, -2] | d64[:, :, -1])
    assert m128.density >= m64.density


def test_mask_rejects_bad_arguments():
    S = GRID.num_tokens
    q = torch.randn(1, 1, S, 16)
    for bad in (0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            nabla_mask(q, q, GRID, threshold=bad)
    for bad in ((2, 3, 3), (1, 3), (0, 1, 1), (1.0, 1, 1)):
        with pytest.raises(ValueError, match="sta_window"):
            nabla_mask(q, q, GRID, threshold=0.5, sta_window=bad)
    with pytest.raises(ValueError, match="needs a threshold"):
        nabla_mask(q, q, GRID, threshold=None)
    with pytest.raises(ValueError, match="query_block"):
        nabla_mask(q, q, GRID, query_block=32)
    with pytest.raises(ValueError, match="block shape"):
        BlockSparseMask(torch.ones(1, 1, 3, 3, dtype=torch.bool), nabla_mask(q, q, GRID).layout)


def test_kv_lists_compact_rows():
    kept = torch.rand(2, 3, 7, 11) > 0.6
    from nabla_attn.masks import compact_rows

    counts, idx = compact_rows(kept)
    for b in range(2):
        for h in range(3):
            for r in range(7):
                cols = torch.nonzero(kept[b, h, r]).squeeze(1).int()
                assert int(counts[b, h, r]) == len(cols)
                assert torch.equal(idx[b, h, r, : len(cols)], cols)
