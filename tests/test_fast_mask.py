"""The fused Triton mask builder against the eager definition (masks.py), on the CPU through Triton's
interpreter at small, odd sizes."""

from __future__ import annotations

import math

import pytest
import torch

# Must come before anything imports Triton: it switches the CPU interpreter on (triton_interpret.py).
from triton_interpret import DEVICE, only_in_process, rerun_in_fresh_process

pytest.importorskip("triton")

from nabla_attn import MaskSpec, TokenLayout, VideoGrid, backends, sta_mask, tile  # noqa: E402
from nabla_attn.masks import BlockSparseMask, compact_rows, pool_blocks, reference_mask  # noqa: E402

TRITON = backends.get("triton")


def test_in_fresh_process_when_triton_was_imported_first() -> None:
    rerun_in_fresh_process(__file__)


_only_in_process = only_in_process  # autouse fixture, see triton_interpret.py


LAYOUT = TokenLayout(VideoGrid(3, 13, 22), 7)  # 2x3 tiles with ragged edges, 18 video + 1 text block


def _qk(seed: int, B: int = 2, H: int = 1, D: int = 32, structured: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LAYOUT.seq_len, D, generator=g)
    k = torch.randn(B, H, LAYOUT.seq_len, D, generator=g)
    if structured:  # a shared component makes the block maps far from uniform
        common = torch.randn(1, H, LAYOUT.seq_len, D, generator=g)
        q, k = q + 2 * common, k + 2 * common
    return tile(q, LAYOUT).to(DEVICE), tile(k, LAYOUT).to(DEVICE)


def _near_cut(q: torch.Tensor, k: torch.Tensor, threshold: float, tol: float = 1e-5) -> torch.Tensor:
    """Video table entries whose float64 running sum lies within ``tol`` of the cut (may flip)."""
    nv = LAYOUT.num_video_blocks
    qa, ka = pool_blocks(q, LAYOUT)[:, :, :nv], pool_blocks(k, LAYOUT)[:, :, :nv]
    p = torch.softmax((qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1])).double(), -1)
    s = (p.unsqueeze(-2) * (p.unsqueeze(-2) <= p.unsqueeze(-1))).sum(-1)  # S(P_j) = sum_{P_i <= P_j} P_i
    near = (s - (1.0 - threshold)).abs() < tol
    full = torch.zeros(*near.shape[:2], LAYOUT.num_blocks, LAYOUT.num_blocks, dtype=torch.bool, device=q.device)
    full[..., :nv, :nv] = near
    return full


def _fast(q, k, threshold, window=None, query_block=64, layout=LAYOUT) -> BlockSparseMask:
    """The fused builder (the Triton backend's), which runs the kernels here under the interpreter."""
    return TRITON.build_mask(q, k, layout, MaskSpec(threshold, window, query_block))[0]


def _lists(q, k, threshold, window=None, query_block=64):  # type: ignore[no-untyped-def]
    return TRITON.build_mask(q, k, LAYOUT, MaskSpec(threshold, window, query_block))


def nabla_mask_tiled(q, k, layout, threshold, window=None, query_block=64) -> BlockSparseMask:  # type: ignore[no-untyped-def]
    """The eager definition."""
    return reference_mask(q, k, layout, MaskSpec(threshold, window, query_block))


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
def test_fast_mask_matches_eager(threshold: float) -> None:
    q, k = _qk(1)
    fast, eager = _fast(q, k, threshold), nabla_mask_tiled(q, k, LAYOUT, threshold)
    differ = fast.kept != eager.kept
    assert not (differ & ~_near_cut(q, k, threshold)).any(), "fast mask differs away from the cut"
    assert differ.float().mean() < 0.01
    f128, e128 = _fast(q, k, threshold, query_block=128), nabla_mask_tiled(q, k, LAYOUT, threshold, query_block=128)
    assert f128.kept.shape == e128.kept.shape == (2, 1, 10, 19)
    if not differ.any():
        assert torch.equal(f128.kept, e128.kept)


@pytest.mark.parametrize("grid,text", [((1, 8, 8), 0), ((2, 16, 16), 0), ((1, 9, 24), 0), ((3, 8, 40), 64), ((1, 24, 24), 0)])
def test_fast_mask_row_segments(grid: tuple[int, int, int], text: int) -> None:
    """Tables of 1, 8, 6, 16 and 9 columns: the row kernel's two column segments (a power of two and
    its rest) cover every column, whole powers of two included, with and without query grouping."""
    from nabla_attn.kernels.mask_build import row_segments

    layout = TokenLayout(VideoGrid(*grid), text)
    main, tail = row_segments(layout.num_blocks)
    assert main + tail >= layout.num_blocks and main & (main - 1) == 0 and tail & (tail - 1) == 0
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(2))
    qt, kt = tile(q, layout).to(DEVICE), tile(k, layout).to(DEVICE)
    for qb in (64, 128):
        fast, lists = TRITON.build_mask(qt, kt, layout, MaskSpec(0.6, (1, 1, 3), qb))
        eager = nabla_mask_tiled(qt, kt, layout, 0.6, (1, 1, 3), query_block=qb)
        assert torch.equal(fast.kept, eager.kept)
        assert torch.equal(lists.counts, compact_rows(fast.kept)[0])


@pytest.mark.parametrize("window", [(1, 3, 3), (3, 1, 5)])
@pytest.mark.parametrize("query_block", [64, 128])
def test_fast_mask_with_sta_and_text(window: tuple[int, int, int], query_block: int) -> None:
    q, k = _qk(2)
    fast = _fast(q, k, 0.5, window, query_block)
    eager = nabla_mask_tiled(q, k, LAYOUT, 0.5, window, query_block=query_block)
    assert torch.equal(fast.kept, eager.kept)
    # Text rows and columns are always kept.
    nv = LAYOUT.num_video_blocks
    assert fast.kept[..., nv:].all()
    if query_block == 64:
        assert fast.kept[..., nv:, :].all()
    # STA alone (threshold None) equals sta_mask.
    sta = _fast(q, k, None, window, query_block)
    assert torch.equal(sta.kept, sta_mask(LAYOUT.grid, window, 7, query_block=query_block, device=DEVICE).kept)


def test_fast_mask_kv_lists_are_compact_rows() -> None:
    q, k = _qk(3)
    for qb in (64, 128):
        m, lists = _lists(q, k, 0.7, (1, 1, 3), qb)
        counts, idx = lists.counts, lists.indices  # written by the builder itself
        ref_counts, ref_idx = compact_rows(m.kept)
        assert torch.equal(counts, ref_counts)
        for row in zip(*torch.nonzero(counts >= 0, as_tuple=True)):
            n = int(counts[row])
            assert torch.equal(idx[row][:n], ref_idx[row][:n])


def test_fast_mask_ties_kept_together() -> None:
    # Integer-valued q, k in {-1, 0, 1} make many equal block scores; k = 0 makes a whole row uniform.
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-1, 2, (1, 2, LAYOUT.seq_len, 8), generator=g).float()
    k = torch.randint(-1, 2, (1, 2, LAYOUT.seq_len, 8), generator=g).float()
    k[:, 1] = 0.0
    qt, kt = tile(q, LAYOUT).to(DEVICE), tile(k, LAYOUT).to(DEVICE)
    for threshold in (0.3, 0.5, 0.8):
        fast, eager = _fast(qt, kt, threshold), nabla_mask_tiled(qt, kt, LAYOUT, threshold)
        differ = fast.kept != eager.kept
        assert not (differ & ~_near_cut(qt, kt, threshold)).any()
        assert fast.kept[:, 1].all(), "a uniform row is one tie: all kept"


def test_fast_mask_nonfinite_rows_keep_everything() -> None:
    q, k = _qk(5, B=1, H=1)
    q[0, 0, 64 * 4 + 3] = float("nan")  # a token of video block 4
    m = _fast(q, k, 0.3)
    assert m.kept[0, 0, 4].all()
    assert not m.kept[0, 0, 5].all()
    assert torch.equal(m.kept, nabla_mask_tiled(q, k, LAYOUT, 0.3).kept)


def test_fast_mask_dominant_block_in_tail_segment() -> None:
    """A key block whose score exceeds the rest by far more than float32's exp range (block 17 sits
    in the row kernel's tail segment): the softmax max must cover both segments, or exp overflows."""
    from nabla_attn.kernels.mask_build import row_segments

    assert row_segments(LAYOUT.num_blocks)[0] <= 17
    q, k = _qk(6, B=1, H=1)
    direction = torch.randn(q.shape[-1], generator=torch.Generator().manual_seed(7)).to(DEVICE)
    q = q + 3 * direction
    k[0, 0, 64 * 17: 64 * 17 + int(LAYOUT.block_counts()[17])] += 300 * direction
    fast, eager = _fast(q, k, 0.5), nabla_mask_tiled(q, k, LAYOUT, 0.5)
    assert torch.equal(fast.kept, eager.kept)
    assert not fast.kept[0, 0, :18, :17].any(), "only the dominant block (and text) should be kept"


@pytest.mark.parametrize("transpose", [False, True])
def test_compact_kernel(transpose: bool) -> None:
    from nabla_attn.kernels.mask_build import compact

    g = torch.Generator().manual_seed(6)
    kept = (torch.rand(2, 1, 19, 23, generator=g) < 0.3).to(DEVICE)
    counts, idx = compact(kept, transpose=transpose)
    table = kept.transpose(-1, -2) if transpose else kept
    ref_counts, ref_idx = compact_rows(table)
    assert torch.equal(counts, ref_counts)
    for row in zip(*torch.nonzero(counts >= 0, as_tuple=True)):
        n = int(counts[row])
        assert torch.equal(idx[row][:n], ref_idx[row][:n])


def test_fast_mask_rejects_bad_arguments() -> None:
    from nabla_attn import nabla_mask_tiled as public_mask_tiled

    q, k = _qk(7, B=1, H=1)
    with pytest.raises(ValueError, match="threshold"):
        _fast(q, k, 1.5)
    with pytest.raises(ValueError, match="query_block"):
        _fast(q, k, 0.5, query_block=96)
    with pytest.raises(ValueError, match="seq length 1152 .*tiled length"):
        public_mask_tiled(q[:, :, :-64], k[:, :, :-64], LAYOUT, 0.5, backend="triton")
    short = torch.zeros(1, 1, LAYOUT.num_video_blocks - 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="block means must be float32"):
        TRITON.mask_from_means(short, short, LAYOUT, MaskSpec(0.5))


def test_threshold_near_zero_keeps_each_rows_largest_block() -> None:
    """For a threshold of ~1e-9 the float32 cut rounds to 1.0 and a row's float32 total can fall
    short of it; with exact sums the largest block always reaches the cut, so it is kept (both builders)."""
    q, k = _qk(8)
    for threshold in (1e-9, 1e-30):
        fast, eager = _fast(q, k, threshold), nabla_mask_tiled(q, k, LAYOUT, threshold)
        nv = LAYOUT.num_video_blocks
        assert torch.equal(fast.kept, eager.kept)
        assert (fast.kept[..., :nv, :nv].sum(-1) >= 1).all(), "every video row keeps at least one block"
        qa, ka = pool_blocks(q, LAYOUT, nv), pool_blocks(k, LAYOUT, nv)
        best = (qa @ ka.transpose(-1, -2)).argmax(-1)
        assert fast.kept[..., :nv, :nv].gather(-1, best[..., None]).all()


@pytest.mark.parametrize("query_block", [64, 128])
def test_means_from_tiling_give_the_same_mask(query_block: int) -> None:
    """The tiling kernel's block means are the pooling kernel's bits, so the mask is the same table;
    the public path on natural-order inputs (``nabla_mask``, as ``nabla_attention``) uses them."""
    from nabla_attn import nabla_mask
    from nabla_attn.kernels.mask_build import pool_pair

    g = torch.Generator().manual_seed(21)
    B, H, D = 2, 2, 32
    # [B, H, S, D] views of [B, S, H, D] memory, as diffusers hands q and k over.
    q, k = (torch.randn(B, LAYOUT.seq_len, H, D, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2))
    nv = LAYOUT.num_video_blocks
    (qt, qa), (kt, ka) = TRITON.tile(q, LAYOUT, pool=True), TRITON.tile(k, LAYOUT, pool=True)
    assert qa is not None and ka is not None
    assert torch.equal(qt.cpu(), tile(q.cpu(), LAYOUT)) and torch.equal(kt.cpu(), tile(k.cpu(), LAYOUT))
    want = pool_pair(qt, kt, LAYOUT.block_counts(DEVICE), nv)
    assert torch.equal(qa, want[0]) and torch.equal(ka, want[1])
    spec = MaskSpec(0.6, None, query_block)
    # Equal means give equal tables; the public path on natural-order inputs (``nabla_mask``, as
    # ``nabla_attention``) builds the mask from the means its tiling wrote.
    with_means = TRITON.build_mask(qt, kt, LAYOUT, spec, (qa, ka))[0]
    used = nabla_mask(q, k, LAYOUT.grid, 0.6, text_tokens=7, backend="triton", query_block=query_block)
    assert torch.equal(used.kept, with_means.kept)
