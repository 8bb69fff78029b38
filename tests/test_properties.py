"""Property tests (hypothesis) of the definitions: random grids, text, thresholds, windows, blocks.

Each property draws a layout (1-24 frames, 1-70 tokens high and wide, 0-130 text tokens at the end
or the start), a threshold (None with an STA window, 1.0, tiny ones down to the smallest float, any
in between), an STA window (odd, 1..7 per axis, or None), a query block (64, 128), batch 1-2, heads
1-3 and a small head_dim. Examples are derandomized, so CI runs the same ones every time; the number
of tokens per example is bounded (the float64 SDPA oracle holds a ``[B, H, S, S]`` matrix) by
shrinking the width, then the number of frames, of a drawn grid.

Run: ``.venv/bin/python -m pytest -q tests/test_properties.py`` (docs/reliability.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import nabla_attn
from conftest import masked_sdpa, max_err, token_mask
from nabla_attn import BLOCK_TOKENS, BlockSparseMask, MaskSpec, TokenLayout, VideoGrid, nabla_attention, nabla_mask, sta_mask
from nabla_attn import grid as grid_mod
from nabla_attn.backends.fused import interpreting
from nabla_attn.masks import pool_blocks

# Reproducible in CI, no example database written into the checkout, no per-example deadline
# (the first call of a layout builds its index tables).
PROFILE = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SDPA_TOKENS = 3000  # the float64 oracle: at most this many tokens per example ...
SDPA_PAIRS = 1.0e7  # ... and at most this many (batch x heads x S x S) score entries
MASK_TOKENS = 24_000  # the mask properties hold no S x S matrix

# Sizes around the 8-token tile edge and the 64-token text blocks are drawn more often.
sizes = st.one_of(st.integers(1, 70), st.sampled_from([1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 70]))
text_counts = st.one_of(st.integers(0, 130), st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, 130]))
tiny = st.sampled_from([1e-9, 1e-7, 1e-12, 1e-30, 5e-324])
thresholds = st.one_of(st.just(1.0), tiny, st.floats(1e-9, 1.0), st.sampled_from([0.1, 0.5, 0.7, 0.9, 0.99]))
windows = st.tuples(*(st.sampled_from([1, 3, 5, 7]) for _ in range(3)))


@st.composite
def layouts(draw, max_tokens: int) -> TokenLayout:
    """A token layout with at most ``max_tokens`` tokens: the drawn width, then frames, shrink to fit."""
    frames, height, width = draw(st.integers(1, 24)), draw(sizes), draw(sizes)
    text = draw(text_counts)
    position = draw(st.sampled_from(["end", "start"]))
    budget = max(1, max_tokens - text)
    width = max(1, min(width, budget // height))
    frames = max(1, min(frames, budget // (height * width)))
    return TokenLayout(VideoGrid(frames, height, width), text, position)


@st.composite
def mask_specs(draw, threshold_needed: bool = False) -> tuple[float | None, tuple[int, int, int] | None]:
    """(threshold, sta_window): None thresholds come with a window."""
    threshold = draw(thresholds if threshold_needed else st.one_of(st.none(), thresholds))
    window = draw(windows) if threshold is None else draw(st.one_of(st.none(), windows))
    return threshold, window


def structured(gen: torch.Generator, B: int, H: int, S: int, D: int, gain: float, dtype=torch.float64):
    """q, k with structure (per-head offsets, a drift along the sequence), so masks are far from dense."""
    q = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)
    q = gain * (q + 1.5 * torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64))
    k = gain * (k + torch.randn(B, H, S, D, generator=gen, dtype=torch.float64).cumsum(2) / max(S, 1) ** 0.5)
    return q.to(dtype), k.to(dtype)


seeds = st.integers(0, 2**31 - 1)
gains = st.sampled_from([0.3, 1.0, 3.0, 10.0])


# ------------------------------------------------------------------------------------ the oracle
@st.composite
def oracle_cases(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    budget = int(min(SDPA_TOKENS, math.sqrt(SDPA_PAIRS / (B * H))))
    return B, H, draw(layouts(budget))


@settings(max_examples=40, **PROFILE)
@given(case=oracle_cases(), spec=mask_specs(), query_block=st.sampled_from([64, 128]),
       D=st.sampled_from([8, 16]), Dv=st.sampled_from([None, 5]), table=st.sampled_from(["nabla", "nabla", "random"]),
       order=st.sampled_from(["natural", "tiled"]), seed=seeds, gain=gains)
def test_reference_equals_masked_float64_sdpa(case, spec, query_block, D, Dv, table, order, seed, gain):
    """The reference backend computes exactly masked attention on its mask's own table (float64), in
    either token order; with a random table (some rows empty) too, empty rows giving zeros."""
    B, H, lay = case
    threshold, window = spec
    gen = torch.Generator().manual_seed(seed)
    q, k = structured(gen, B, H, lay.seq_len, D, gain)
    v = torch.randn(B, H, lay.seq_len, Dv or D, generator=gen, dtype=torch.float64)
    grid, text, pos = lay.grid, lay.text_tokens, lay.text_position
    mask = None
    if table == "random":
        nq = -(-lay.num_blocks // (query_block // BLOCK_TOKENS))
        kept = torch.rand(B, H, nq, lay.num_blocks, generator=gen) < torch.rand((), generator=gen)
        kept[:, :, torch.rand(nq, generator=gen) < 0.3] = False  # empty rows
        mask = BlockSparseMask(kept, lay, query_block)
    kwargs = dict(backend="reference", return_mask=True, mask=mask, query_block=None if mask is not None else query_block)
    if order == "natural":
        out, used = nabla_attention(q, k, v, grid, threshold, window, text, pos, **kwargs)
    else:
        til, used = nabla_attention(grid_mod.tile(q, lay), grid_mod.tile(k, lay), grid_mod.tile(v, lay), grid, threshold,
                                    window, text, pos, token_order="tiled", **kwargs)
        out = grid_mod.untile(til, lay)
    assert used.layout == lay and used.query_block == query_block
    assert used.dense().shape[2:] == (-(-lay.num_blocks // (query_block // BLOCK_TOKENS)), lay.num_blocks)
    if mask is not None:
        assert used is mask
    assert out.shape == v.shape and out.dtype == torch.float64
    allowed = token_mask(used, B, H)
    want = masked_sdpa(q, k, v, allowed)
    note(f"layout {lay}, density {used.density:.3f}")
    assert max_err(out, want) < 1e-10
    assert torch.all(out[~allowed.any(-1)] == 0)


# ------------------------------------------------------------------------------------ tile/untile
def expected_positions(lay: TokenLayout) -> torch.Tensor:
    """Tiled position of each natural token, written from the layout's description."""
    g = lay.grid
    T, H, W = g.frames, g.height, g.width
    t = torch.arange(T).repeat_interleave(H * W)
    h = torch.arange(H).repeat_interleave(W).repeat(T)
    w = torch.arange(W).repeat(T * H)
    tile_w = torch.clamp(W - (w // 8) * 8, max=8)  # real width of the token's tile
    block = (t * g.tile_rows + h // 8) * g.tile_cols + w // 8
    video = block * BLOCK_TOKENS + (h % 8) * tile_w + w % 8
    text = lay.num_video_blocks * BLOCK_TOKENS + torch.arange(lay.text_tokens)
    return torch.cat([text, video] if lay.text_position == "start" else [video, text])


@settings(max_examples=50, **PROFILE)
@given(lay=layouts(MASK_TOKENS), B=st.integers(1, 2), C=st.integers(1, 3), E=st.integers(1, 4))
def test_tile_untile_round_trip_and_zero_padding(lay, B, C, E):
    """Natural -> tiled -> natural is the identity, along dim -2 and along dim 1 of ``[B, S, C, E]``,
    for the eager definitions and the public functions; padding slots are zeros, real slots hold
    every token exactly once, in the order of the layout's gather index."""
    S, N = lay.seq_len, lay.tiled_len
    valid = lay.valid_tokens()
    assert int(valid.sum()) == S and N == lay.num_blocks * BLOCK_TOKENS
    # No real value is 0, so a zero slot can only be padding.
    x = (torch.arange(B * C * S * E, dtype=torch.float64) + 1).view(B, C, S, E)
    tilers = [(grid_mod.tile, grid_mod.untile)]
    if not interpreting():  # under Triton's CPU interpreter the public functions run the kernel: minutes here
        tilers.append((nabla_attn.tile, nabla_attn.untile))
    for tile, untile in tilers:
        t = tile(x, lay)  # dim -2 of [B, H, S, D]
        assert t.shape == (B, C, N, E)
        assert torch.all(t[:, :, ~valid] == 0) and torch.all(t[:, :, valid] != 0)
        assert torch.equal(t[:, :, valid], x[:, :, lay.gather_index()[valid]])
        assert torch.equal(untile(t, lay), x)
        assert torch.equal(tile(untile(t, lay), lay), t)
        y = x.transpose(1, 2).contiguous()  # [B, S, C, E], tokens along dim 1
        ty = tile(y, lay, dim=1)
        assert ty.shape == (B, N, C, E) and torch.equal(ty, t.transpose(1, 2))
        assert torch.equal(untile(ty, lay, dim=1), y)
        assert torch.equal(untile(ty, lay, dim=-3), y)
    # The tiled position of every token, from the definition: video blocks frame-major over (frame,
    # tile row, tile column), a tile's real tokens row-major first, then the text tokens in order.
    assert torch.equal(lay.scatter_index(), expected_positions(lay))
    assert torch.equal(lay.gather_index()[lay.scatter_index()], torch.arange(S))
    counts = lay.block_counts()
    assert torch.equal(valid.view(-1, BLOCK_TOKENS), torch.arange(BLOCK_TOKENS) < counts[:, None])


# --------------------------------------------------------------------------------- mask properties
@st.composite
def mask_cases(draw, threshold_needed: bool = False):
    lay = draw(layouts(MASK_TOKENS))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([8, 16]))
    gen = torch.Generator().manual_seed(draw(seeds))
    q, k = structured(gen, B, H, lay.seq_len, D, draw(gains), dtype=torch.float32)
    return lay, q, k, draw(mask_specs(threshold_needed))


def _mask(q, k, lay, threshold, window, query_block):
    return nabla_mask(q, k, lay.grid, threshold, window, lay.text_tokens, lay.text_position,
                      query_block=query_block, backend="reference")


@settings(max_examples=35, **PROFILE)
@given(case=mask_cases())
def test_query_block_128_is_the_union_of_64_row_pairs(case):
    """Row r of the 128-row table is the OR of 64-token rows 2r and 2r+1 (the last row alone when
    the number of blocks is odd), at the same threshold and window: a superset of the 64-row table."""
    lay, q, k, (threshold, window) = case
    d64 = _mask(q, k, lay, threshold, window, 64).dense()
    d128 = _mask(q, k, lay, threshold, window, 128).dense()
    nb = lay.num_blocks
    assert d64.shape[2:] == (nb, nb) and d128.shape[2:] == ((nb + 1) // 2, nb)
    expected = d64[:, :, 0::2].clone()
    expected[:, :, : nb // 2] |= d64[:, :, 1::2]
    assert torch.equal(d128, expected)
    rows128 = d128.repeat_interleave(2, dim=2)[:, :, :nb]
    assert torch.all(rows128 >= d64)  # contains


@settings(max_examples=35, **PROFILE)
@given(case=mask_cases(threshold_needed=True), window=windows, query_block=st.sampled_from([64, 128]))
def test_nabla_union_sta_is_the_or_of_both(case, window, query_block):
    """NABLA with an STA window keeps exactly what NABLA alone or STA alone keeps (and so contains both)."""
    lay, q, k, (threshold, _) = case
    both = _mask(q, k, lay, threshold, window, query_block).dense()
    nabla_only = _mask(q, k, lay, threshold, None, query_block).dense()
    sta_only = _mask(q, k, lay, None, window, query_block).dense()
    sta = sta_mask(lay.grid, window, lay.text_tokens, lay.text_position, query_block=query_block).dense()
    assert torch.equal(sta_only, sta)
    assert torch.equal(both, nabla_only | sta_only)
    assert torch.all(both >= nabla_only) and torch.all(both >= sta_only)


def _block_probs(q, k, lay):
    """Float32 block probabilities over video key blocks, computed as the definition says."""
    nv = lay.num_video_blocks
    qa = pool_blocks(grid_mod.tile(q, lay), lay, nv)
    ka = pool_blocks(grid_mod.tile(k, lay), lay, nv)
    return torch.softmax(qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


@settings(max_examples=35, **PROFILE)
@given(case=mask_cases(threshold_needed=True), threshold=st.one_of(tiny, thresholds), query_block=st.sampled_from([64, 128]))
def test_every_row_keeps_its_largest_block_and_text_is_kept(case, threshold, query_block):
    """For any threshold, every video query row keeps at least one key block: its largest
    probability (and the blocks tied with it); text rows and text columns are kept whole."""
    lay, q, k, _ = case
    kept = _mask(q, k, lay, threshold, None, query_block).dense()
    nv, nb, group = lay.num_video_blocks, lay.num_blocks, query_block // BLOCK_TOKENS
    assert kept.any(-1).all()
    probs = _block_probs(q, k, lay)  # [B, H, nv, nv]
    largest = probs == probs.max(-1, keepdim=True).values
    rows = torch.arange(nv) // group
    assert torch.all(kept[:, :, rows, :nv] >= largest)
    # 64-token rows in [nv, nb) are text; a query row holding any of them keeps everything
    text_rows = sorted({r // group for r in range(nv, nb)})
    assert kept[:, :, text_rows].all()
    assert kept[:, :, :, nv:].all()
    if threshold == 1.0:
        assert kept.all()


@settings(max_examples=35, **PROFILE)
@given(case=mask_cases(threshold_needed=True))
def test_kept_blocks_are_the_smallest_top_set_holding_the_threshold(case):
    """NABLA's cut, per video row: every kept block is more probable than every dropped one, the kept
    blocks hold at least ``threshold`` of the mass, and without their least probable (tied) blocks
    they would not: up to float32 rounding of the sums (1e-4), and except a row's largest block,
    which is always kept."""
    lay, q, k, (threshold, _) = case
    nv = lay.num_video_blocks
    kept = _mask(q, k, lay, threshold, None, 64).dense()[:, :, :nv, :nv]
    probs = _block_probs(q, k, lay).double()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    min_kept = torch.where(kept, probs, inf).min(-1).values
    max_dropped = torch.where(kept, -inf, probs).max(-1).values
    assert torch.all(min_kept > max_dropped)
    mass = torch.where(kept, probs, 0).sum(-1)
    largest_only = kept.sum(-1) == (probs == probs.max(-1, keepdim=True).values).sum(-1)
    assert torch.all((mass >= threshold - 1e-4) | largest_only)
    least = torch.where(kept & (probs == min_kept[..., None]), probs, 0).sum(-1)
    assert torch.all((mass - least < threshold + 1e-4) | largest_only)


@st.composite
def tie_cases(draw):
    """Integer-valued q, k whose key blocks repeat a few integer patterns: block means, scores and
    probabilities of equal patterns are exactly equal, so rows are full of ties."""
    lay = draw(layouts(MASK_TOKENS))
    B, H, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([8, 16]))
    gen = torch.Generator().manual_seed(draw(seeds))
    patterns = torch.randint(-3, 4, (B, H, draw(st.integers(1, 4)), D), generator=gen).double()
    which = torch.randint(0, patterns.shape[2], (lay.num_blocks,), generator=gen)
    kt = patterns[:, :, which].repeat_interleave(BLOCK_TOKENS, dim=2)  # tiled: every slot of a block alike
    k = grid_mod.untile(kt, lay).float()
    q = torch.randint(-3, 4, (B, H, lay.seq_len, D), generator=gen).float()
    return lay, q, k


@settings(max_examples=35, **PROFILE)
@given(case=tie_cases(), threshold=thresholds, seed=seeds)
def test_ties_are_kept_or_dropped_together(case, threshold, seed):
    """Key blocks of equal probability in a row are all kept or all dropped, so the table does not
    depend on the order a sort puts ties in: permuting k's frames permutes the table's columns."""
    lay, q, k = case
    kept = _mask(q, k, lay, threshold, None, 64).dense()
    nv = lay.num_video_blocks
    probs = _block_probs(q, k, lay)
    video = kept[:, :, :nv, :nv]
    # Sorted by probability, neighbours of equal probability have equal decisions.
    sorted_p, order = torch.sort(probs, dim=-1)
    decision = video.gather(-1, order)
    tied = sorted_p[..., 1:] == sorted_p[..., :-1]
    assert torch.all((decision[..., 1:] == decision[..., :-1]) | ~tied)
    # Equivariance: k with its frames permuted gives the table with its key-block columns permuted.
    g = lay.grid
    if g.frames > 1:
        perm = torch.randperm(g.frames, generator=torch.Generator().manual_seed(seed))
        video_tokens = g.height * g.width
        off = lay.text_tokens if lay.text_position == "start" else 0
        kp = k.clone()
        frames = k[:, :, off : off + g.num_tokens].view(*k.shape[:2], g.frames, video_tokens, -1)
        kp[:, :, off : off + g.num_tokens] = frames[:, :, perm].reshape(*k.shape[:2], g.num_tokens, -1)
        per_frame = nv // g.frames
        cols = (perm[:, None] * per_frame + torch.arange(per_frame)).reshape(-1)  # new column c holds old cols[c]
        probs_p = _block_probs(q, kp, lay)
        if torch.equal(probs_p, probs[..., cols]):  # softmax sums in another order may round differently
            kept_p = _mask(q, kp, lay, threshold, None, 64).dense()
            assert torch.equal(kept_p[:, :, :nv, :nv], video[..., cols])
        else:
            note("probabilities of the permuted k differ in rounding; equivariance not checked")


# ----------------------------------------------------------------------------------- numpy numbers
@settings(max_examples=8, **PROFILE)
@given(lay=layouts(4000), window=windows, query_block=st.sampled_from([64, 128]),
       threshold=st.sampled_from([0.7, 0.35, 0.9, 1.0]), seed=seeds)
def test_numpy_scalars_give_the_same_table_as_python_numbers(lay, window, query_block, threshold, seed):
    """MaskSpec takes numpy numbers (float32/float64 thresholds, int64/int32 windows and query
    blocks) and builds the table Python numbers of the same value build; so do nabla_mask and
    nabla_attention (grid sizes, text tokens and scale as numpy numbers too)."""
    np_window = (np.int64(window[0]), np.int32(window[1]), np.int64(window[2]))
    f32 = np.float32(threshold)  # a float32 is its own value: np.float32(0.9) is 0.89999998...
    spec = MaskSpec(f32, np_window, np.int64(query_block))
    py = MaskSpec(float(f32), window, query_block)
    assert spec == py and type(spec.threshold) is float and type(spec.query_block) is int
    assert all(type(w) is int for w in spec.sta_window)
    assert MaskSpec(np.float64(threshold), np_window, np.int32(query_block)) == MaskSpec(threshold, window, query_block)
    assert MaskSpec(np.float32(0.7)).cut == MaskSpec(0.7).cut  # the example: the same float32 cut
    gen = torch.Generator().manual_seed(seed)
    q, k = structured(gen, 1, 2, lay.seq_len, 8, 1.0, dtype=torch.float32)
    grid = VideoGrid(np.int32(lay.grid.frames), np.int64(lay.grid.height), np.int32(lay.grid.width))
    text = np.int64(lay.text_tokens)
    for th, py_th in ((f32, float(f32)), (np.float64(threshold), threshold), (None, None)):
        got = nabla_mask(q, k, grid, th, np_window, text, lay.text_position, query_block=np.int64(query_block),
                         backend="reference")
        want = _mask(q, k, lay, py_th, window, query_block)
        assert got.layout == want.layout and torch.equal(got.dense(), want.dense())
    out = nabla_attention(q, k, k, grid, f32, np_window, text, lay.text_position,
                          query_block=np.int64(query_block), scale=np.float64(0.25), backend="reference")
    ref = nabla_attention(q, k, k, lay.grid, float(f32), window, lay.text_tokens, lay.text_position,
                          query_block=query_block, scale=0.25, backend="reference")
    assert torch.equal(out, ref)
