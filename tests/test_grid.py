import pytest
import torch

from nabla_attn import BLOCK_TOKENS, TokenLayout, VideoGrid, tile, untile


@pytest.mark.parametrize("grid", [VideoGrid(3, 13, 22), VideoGrid(2, 8, 16), VideoGrid(1, 5, 3), VideoGrid(4, 30, 52)])
@pytest.mark.parametrize("text,pos", [(0, "end"), (7, "end"), (7, "start"), (130, "start")])
def test_roundtrip_and_padding(grid, text, pos):
    lay = TokenLayout(grid, text, pos)
    x = torch.randn(2, 3, lay.seq_len, 5)
    t = tile(x, lay)
    assert t.shape == (2, 3, lay.num_blocks * BLOCK_TOKENS, 5)
    assert torch.equal(untile(t, lay), x)
    valid = lay.valid_tokens()
    assert int(valid.sum()) == lay.seq_len
    assert torch.all(t[..., ~valid, :] == 0)
    # counts: real tokens first in each slot
    counts = lay.block_counts()
    slots = valid.view(lay.num_blocks, BLOCK_TOKENS)
    assert torch.equal(slots.sum(1).int(), counts)
    assert torch.equal(slots, torch.arange(BLOCK_TOKENS)[None, :] < counts[:, None])


def test_block_numbering_is_frame_major():
    grid = VideoGrid(2, 13, 22)  # tiles: 2 rows x 3 cols per frame
    lay = TokenLayout(grid, 5, "start")
    assert lay.num_video_blocks == 2 * 2 * 3 and lay.num_text_blocks == 1
    scatter = lay.scatter_index()

    def block_of(t, h, w):
        return int(scatter[5 + t * 13 * 22 + h * 22 + w]) // BLOCK_TOKENS

    assert block_of(0, 0, 0) == 0
    assert block_of(0, 7, 7) == 0
    assert block_of(0, 0, 8) == 1
    assert block_of(0, 12, 21) == 5  # bottom-right edge tile of frame 0
    assert block_of(1, 8, 0) == 6 + 3
    # text tokens live in the last block whatever their natural position
    assert all(int(scatter[i]) // BLOCK_TOKENS == 12 for i in range(5))
    # edge tile 5 holds 5 rows x 6 cols = 30 tokens, row-major
    assert int(lay.block_counts()[5]) == 30
    first = int(scatter[5 + 8 * 22 + 16])
    assert first == 5 * BLOCK_TOKENS


@pytest.mark.parametrize("grid,text", [(VideoGrid(3, 13, 22), 7), (VideoGrid(2, 8, 16), 0), (VideoGrid(1, 5, 3), 0),
                                       (VideoGrid(4, 9, 9), 130)])
def test_query_pairs_cover_every_block_once(grid, text):
    """The 64-row forward's pairs: every block in exactly one pair; video pairs are one tile in
    frames 2i and 2i+1; what is left (an odd frame count's last frame, text blocks) pairs in block
    order, an odd total ending on a partner -1."""
    lay = TokenLayout(grid, text)
    pairs = lay.table("query_pairs")
    assert pairs.dtype == torch.int32 and pairs.shape == ((lay.num_blocks + 1) // 2, 2)
    flat = pairs.flatten()
    assert sorted(flat[flat >= 0].tolist()) == list(range(lay.num_blocks))
    assert int((flat < 0).sum()) == lay.num_blocks % 2 and (flat[:-1] >= 0).all()
    per_frame = grid.tile_rows * grid.tile_cols
    temporal = (grid.frames // 2) * per_frame
    for a, b in pairs[:temporal].tolist():
        assert b - a == per_frame and (a // per_frame) % 2 == 0
    rest = pairs[temporal:].flatten()
    assert rest[rest >= 0].tolist() == list(range(2 * temporal, lay.num_blocks))


def test_tile_rejects_wrong_length():
    lay = TokenLayout(VideoGrid(2, 9, 9))
    with pytest.raises(ValueError, match="162"):
        tile(torch.randn(1, 1, 100, 4), lay)
    with pytest.raises(ValueError, match="tiled tokens"):
        untile(torch.randn(1, 1, 100, 4), lay)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_grid_rejects_bad_sizes(bad, error):
    with pytest.raises(error, match="VideoGrid.height"):
        VideoGrid(1, bad, 8)


def test_grid_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    grid = VideoGrid(np.int64(2), np.int32(9), 13)
    assert grid == VideoGrid(2, 9, 13) and type(grid.frames) is int


def test_layout_rejects_bad_text():
    with pytest.raises(ValueError, match="text_tokens"):
        TokenLayout(VideoGrid(1, 8, 8), -3)
    with pytest.raises(ValueError, match="text_position"):
        TokenLayout(VideoGrid(1, 8, 8), 3, "middle")
