"""Every bad input we know, one table: each must raise exactly this exception type with a message
naming the values (docs/reliability.md lists the same table). Then the inputs that must be accepted
(numpy numbers), the behaviours that are documented instead of raising, and the ``nabla example``
command's bad arguments (exit status 2, one ``error:`` line, no traceback)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nabla_attn
from conftest import masked_sdpa, max_err, token_mask
from nabla_attn import (BlockSparseMask, MaskSpec, TokenLayout, VideoGrid, nabla_attention, nabla_mask, nabla_mask_tiled,
                        select_backend, sta_mask)
from nabla_attn import attention as attention_mod
from nabla_attn import grid as grid_mod
from nabla_attn.backends import fused
from nabla_attn.cli import main as cli_main

GRID = VideoGrid(3, 13, 22)  # 858 tokens, 2 x 3 tiles per frame, 18 blocks
LAYOUT = TokenLayout(GRID)
S = GRID.num_tokens


def t(B=1, H=2, seq=S, D=16, dtype=torch.float32, device="cpu"):
    return torch.randn(B, H, seq, D, dtype=dtype, device=device)


X = t()  # a valid q = k = v


@pytest.fixture(autouse=True)
def _triton_not_interpreting(monkeypatch):
    """Under Triton's CPU interpreter (TRITON_INTERPRET=1 in the process, as tests/triton_interpret.py
    sets it when it can) the Triton backend runs CPU tensors; here it must see a plain CPU, and no
    cached backend choice."""
    monkeypatch.setattr(fused, "_interpreting", lambda: False)
    attention_mod._choose_uncached.cache_clear()
    yield
    attention_mod._choose_uncached.cache_clear()


def deprecated_layout_conflict():
    with pytest.warns(DeprecationWarning, match=r"layout=\.\.\.\) is deprecated"):
        nabla_attention(X, X, X, GRID, layout="natural", token_order="tiled")


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[], object]
    error: type[Exception] | tuple[type[Exception], ...]  # exactly this type (or one of these)
    match: str  # regex searched in the message


def both_ops(id: str, error: type[Exception], match: str, q=X, **kw) -> list[Bad]:
    """The same bad argument through nabla_attention and nabla_mask."""
    grid = kw.pop("grid", GRID)
    return [
        Bad(f"attention: {id}", lambda: nabla_attention(q, q, q, grid, **kw), error, match),
        Bad(f"mask: {id}", lambda: nabla_mask(q, q, grid, **kw), error, match),
    ]


THRESHOLD = r"threshold must be a number in \(0, 1\], got "
WINDOW = r"sta_window must be three positive odd integers \(wT, wH, wW\), got "
QUERY_BLOCK = r"query_block must be one of \(64, 128\), got "
MASK64 = sta_mask(GRID, (1, 1, 1))

CASES: list[Bad] = [
    # --- tensors
    *both_ops("batch 0", ValueError, r"at least one batch: q \(0, 2, 858, 16\)", q=t(B=0)),
    *both_ops("heads 0", ValueError, r"at least one heads: q \(1, 0, 858, 16\)", q=t(H=0)),
    *both_ops("head_dim 0", ValueError, r"at least one head_dim: q \(1, 2, 858, 0\)", q=t(D=0)),
    Bad("v head_dim 0", lambda: nabla_attention(X, X, t(D=0), GRID), ValueError, r"at least one v head_dim: .* v \(1, 2, 858, 0\)"),
    *both_ops("seq vs grid", ValueError,
              r"seq length 857 does not match the grid: expected 858 \(3x13x22 = 858 video tokens \+ 0 text tokens\)", q=t(seq=S - 1)),
    *both_ops("seq vs grid + text", ValueError, r"seq length 858 does not match the grid: expected 863 \(.* \+ 5 text tokens\)",
              text_tokens=5),
    *both_ops("seq vs grid, tiled order", ValueError,
              r"seq length 858 does not match the grid: expected 1152 \(tiled length 18 blocks x 64\)", token_order="tiled"),
    *both_ops("dtype int64", TypeError, r"q has dtype torch\.int64; supported: float16, bfloat16, float32, float64",
              q=X.long()),
    Bad("mixed dtypes", lambda: nabla_attention(X, X.half(), X, GRID), TypeError,
        r"q, k, v dtypes differ: torch\.float32, torch\.float16, torch\.float32"),
    Bad("devices differ", lambda: nabla_attention(X, X.to("meta"), X, GRID), ValueError,
        r"q, k, v devices differ: cpu, meta, cpu"),
    Bad("q not a tensor", lambda: nabla_attention(X.tolist(), X, X, GRID), TypeError, r"q must be a torch\.Tensor, got list"),
    Bad("q of rank 3", lambda: nabla_attention(X[0], X[0], X[0], GRID), ValueError,
        r"q must be \[batch, heads, seq, head_dim\], got shape \(2, 858, 16\)"),
    Bad("q, k shapes differ", lambda: nabla_attention(X, t(H=3), X, GRID), ValueError,
        r"q, k, v shapes do not match: q \(1, 2, 858, 16\), k \(1, 3, 858, 16\)"),
    # --- threshold
    *[case for bad, shown in [(0, "0"), (0.0, "0.0"), (-0.5, "-0.5"), (1.0000001, "1.0000001"), (2, "2"),
                              (float("nan"), "nan"), (float("inf"), "inf"), (True, "True"), ("0.7", "'0.7'"),
                              (np.float64("nan"), r"np\.float64\(nan\)"), (torch.tensor(0.5), r"tensor\(0\.5000\)")]
      for case in both_ops(f"threshold {shown}", ValueError, THRESHOLD + shown + "$", threshold=bad)],
    *both_ops("threshold None without a window", ValueError,
              r"a mask needs a threshold, an sta_window, or both \(got neither\)", threshold=None),
    # --- STA window
    *[case for bad, shown in [((2, 3, 3), r"\(2, 3, 3\)"), ((0, 1, 1), r"\(0, 1, 1\)"), ((-1, 3, 3), r"\(-1, 3, 3\)"),
                              ((1.0, 1, 1), r"\(1\.0, 1, 1\)"), ((3, 3), r"\(3, 3\)"), ((1, 1, 1, 1), r"\(1, 1, 1, 1\)"),
                              ("113", "'113'"), (5, "5"), ((True, 1, 1), r"\(True, 1, 1\)"), ((1, None, 1), r"\(1, None, 1\)"),
                              ((np.int64(2), 1, 1), r"\(np\.int64\(2\), 1, 1\)")]
      for case in both_ops(f"sta_window {shown}", ValueError, WINDOW + shown + "$", threshold=0.5, sta_window=bad)],
    Bad("sta_mask without a window", lambda: sta_mask(GRID, None), ValueError, r"sta_mask needs a window \(wT, wH, wW\)"),
    # --- query block
    *[case for bad, shown in [(32, "32"), (True, "True"), (64.0, "64.0"), ("64", "'64'"), (256, "256")]
      for case in both_ops(f"query_block {shown}", ValueError, QUERY_BLOCK + shown + "$", query_block=bad)],
    # --- scale
    Bad("scale nan", lambda: nabla_attention(X, X, X, GRID, scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    Bad("scale inf", lambda: nabla_attention(X, X, X, GRID, scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    Bad("scale -inf with mask=", lambda: nabla_attention(X, X, X, GRID, mask=MASK64, scale=-float("inf")), ValueError,
        r"scale must be finite, got -inf"),
    Bad("scale 'x'", lambda: nabla_attention(X, X, X, GRID, scale="x"), TypeError, r"scale must be a real number, got 'x' \(str\)"),
    Bad("scale True", lambda: nabla_attention(X, X, X, GRID, scale=True), TypeError, r"scale must be a real number, got True \(bool\)"),
    Bad("scale 0-d tensor", lambda: nabla_attention(X, X, X, GRID, scale=torch.tensor(0.3)), TypeError,
        r"scale must be a real number, got tensor\(0\.3000\) \(Tensor\)"),
    # --- mask=
    Bad("mask on another device", lambda: nabla_attention(X, X, X, GRID, mask=sta_mask(GRID, (1, 1, 1), device="meta")),
        ValueError, r"mask is on meta, q on cpu"),
    Bad("mask of another layout", lambda: nabla_attention(t(seq=S + 2), t(seq=S + 2), t(seq=S + 2), GRID, text_tokens=2,
                                                          mask=MASK64),
        ValueError, r"mask was built for TokenLayout\(grid=VideoGrid\(frames=3, height=13, width=22\), text_tokens=0, "
                    r"text_position='end'\), not TokenLayout\(.*text_tokens=2"),
    Bad("mask heads mismatch", lambda: nabla_attention(X, X, X, GRID, mask=nabla_mask(t(H=3), t(H=3), GRID)), ValueError,
        r"mask of batch x heads 1x3 cannot serve q of 1x2"),
    Bad("mask batch mismatch", lambda: nabla_attention(t(B=2), t(B=2), t(B=2), GRID, mask=nabla_mask(t(B=3), t(B=3), GRID)),
        ValueError, r"mask of batch x heads 3x2 cannot serve q of 2x2"),
    Bad("query_block differs from the mask's", lambda: nabla_attention(X, X, X, GRID, mask=MASK64, query_block=128),
        ValueError, r"query_block=128 but the mask has query_block=64; leave query_block unset when passing mask="),
    Bad("mask not a BlockSparseMask", lambda: nabla_attention(X, X, X, GRID, mask=MASK64.kept), TypeError,
        r"mask must be a BlockSparseMask, got Tensor"),
    Bad("BlockSparseMask of floats", lambda: BlockSparseMask(MASK64.kept.float(), LAYOUT), ValueError,
        r"kept must be a 4-D bool tensor, got torch\.float32 \(1, 1, 18, 18\)"),
    Bad("BlockSparseMask of another block shape", lambda: BlockSparseMask(MASK64.kept[..., :3, :3], LAYOUT), ValueError,
        r"kept has block shape \(3, 3\), the layout needs \(18, 18\)"),
    Bad("BlockSparseMask query_block 32", lambda: BlockSparseMask(MASK64.kept, LAYOUT, 32), ValueError, QUERY_BLOCK + "32"),
    Bad("union of other query blocks", lambda: MASK64.union(sta_mask(GRID, (1, 1, 1), query_block=128)), ValueError,
        r"union needs masks of the same layout and query_block"),
    Bad("expand to other heads", lambda: nabla_mask(X, X, GRID).expand(1, 3), ValueError,
        r"mask of batch x heads 1x2 cannot serve 1x3"),
    # --- grid and layout
    *both_ops("grid a tuple", TypeError, r"grid must be a nabla_attn\.VideoGrid, got tuple", grid=(3, 13, 22)),
    Bad("VideoGrid(0, 8, 8)", lambda: VideoGrid(0, 8, 8), ValueError, r"VideoGrid\.frames must be an integer >= 1, got 0"),
    Bad("VideoGrid(1, -3, 8)", lambda: VideoGrid(1, -3, 8), ValueError, r"VideoGrid\.height must be an integer >= 1, got -3"),
    Bad("VideoGrid(2.5, 8, 8)", lambda: VideoGrid(2.5, 8, 8), TypeError, r"VideoGrid\.frames must be an integer, got 2\.5 \(float\)"),
    Bad("VideoGrid(1, 8, True)", lambda: VideoGrid(1, 8, True), TypeError, r"VideoGrid\.width must be an integer, got True \(bool\)"),
    Bad("VideoGrid('2', 8, 8)", lambda: VideoGrid("2", 8, 8), TypeError, r"VideoGrid\.frames must be an integer, got '2' \(str\)"),
    *both_ops("text_tokens -1", ValueError, r"text_tokens must be an integer >= 0, got -1", text_tokens=-1),
    *both_ops("text_tokens 'a'", TypeError, r"text_tokens must be an integer, got 'a' \(str\)", text_tokens="a"),
    *both_ops("text_tokens 2.0", TypeError, r"text_tokens must be an integer, got 2\.0 \(float\)", text_tokens=2.0),
    *both_ops("text_position 'middle'", ValueError, r"text_position must be one of \('end', 'start'\), got 'middle'",
              text_position="middle"),
    Bad("nabla_mask_tiled with a VideoGrid", lambda: nabla_mask_tiled(X, X, GRID), TypeError,
        r"layout must be a nabla_attn\.TokenLayout, got VideoGrid"),
    # --- backend, token order
    *both_ops("backend 'cuda'", ValueError, r"backend must be one of \('auto', 'triton', 'flex', 'cpu', 'reference'\), got 'cuda'",
              backend="cuda"),
    Bad("select_backend 'cuda'", lambda: select_backend(X, "cuda"), ValueError, r"backend must be one of .* got 'cuda'"),
    *both_ops("backend 'triton' on CPU", ValueError,
              r"backend='triton' cannot run tensors (on cpu \(it needs CUDA\)|without Triton installed .*); "
              r"fallback: backend='flex' or 'reference'", backend="triton"),
    Bad("backend 'flex' with head_dim 24", lambda: nabla_attention(t(D=24), t(D=24), t(D=24), GRID, backend="flex"), ValueError,
        r"backend='flex' cannot run head_dim 24 \(flex needs a power of two >= 16, equal for q and v\); fallback: backend='reference'"),
    Bad("backend 'flex' backward on CPU", lambda: nabla_attention(X.clone().requires_grad_(), X, X, GRID, backend="flex"),
        ValueError, r"backend='flex' cannot run a backward pass on CPU .*; fallback: backend='reference'"),
    *both_ops("token_order 'tiles'", ValueError, r"token_order must be 'natural' or 'tiled', got 'tiles'", token_order="tiles"),
    Bad("deprecated layout= against token_order=", deprecated_layout_conflict, ValueError,
        r"token_order='tiled' and the deprecated layout='natural' disagree"),
    # --- tile / untile
    Bad("tile: wrong length", lambda: nabla_attn.tile(t(seq=100), LAYOUT), ValueError,
        r"tile: sequence length 100 along dim -2 does not match the layout's 858"),
    Bad("untile: wrong length", lambda: nabla_attn.untile(t(seq=100), LAYOUT), ValueError,
        r"untile: expected 1152 tiled tokens along dim -2, got 100"),
    Bad("grid.tile: wrong length", lambda: grid_mod.tile(t(seq=100), LAYOUT), ValueError,
        r"tile: sequence length 100 along dim -2 does not match the layout's 858"),
    Bad("untile: like of another shape", lambda: nabla_attn.untile(t(seq=1152), LAYOUT, like=t(seq=857)), ValueError,
        r"untile: like has shape \(1, 2, 857, 16\), the result has \(1, 2, 858, 16\)"),
]

# Bugs found here (src/ untouched; the lead fixes them). Strict: a fix makes these fail as XPASS.
# Where the right exception type is a judgement call, either TypeError or ValueError passes.
EITHER = (TypeError, ValueError)
QA = torch.randn(1, 2, 18, 16)  # float32 video-block means of LAYOUT


FIXED = [
    Bad("mask_from_means: spec a float", lambda: nabla_attn.mask_from_means(QA, QA, LAYOUT, 0.7), TypeError,
        r"MaskSpec.*float"),
    Bad("mask_from_means: layout a VideoGrid", lambda: nabla_attn.mask_from_means(QA, QA, GRID, MaskSpec(0.7)),
        TypeError, r"TokenLayout.*VideoGrid"),
    Bad("select_backend: query_block 32", lambda: select_backend(X, "reference", query_block=32), ValueError,
        QUERY_BLOCK + "32"),
    Bad("tile of a 0-d tensor", lambda: nabla_attn.tile(torch.tensor(1.0), LAYOUT), ValueError, r"dim -2 .*0-D"),
    Bad("untile of a 0-d tensor", lambda: nabla_attn.untile(torch.tensor(1.0), LAYOUT), ValueError, r"dim -2 .*0-D"),
]


@pytest.mark.parametrize("case", [*CASES, *FIXED], ids=lambda c: c.id)
def test_bad_input_raises_naming_the_values(case):
    with pytest.raises(Exception) as info:
        case.call()
    allowed = case.error if isinstance(case.error, tuple) else (case.error,)
    assert type(info.value) in allowed, f"{case.id}: {type(info.value).__name__}: {info.value}"
    assert re.search(case.match, str(info.value)), f"{case.id}: message {str(info.value)!r} lacks {case.match!r}"


def test_case_ids_are_unique():
    ids = [c.id for c in [*CASES, *FIXED]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("tile", [grid_mod.tile, nabla_attn.tile], ids=["grid.tile", "nabla_attn.tile"])
@pytest.mark.parametrize("dim", [4, -5, 7])
def test_tile_dim_out_of_range_raises(tile, dim):
    x = torch.randn(S, 2, 2, S)  # dims 0 and 3 both have the layout's length, so a wrapped dim "works"
    with pytest.raises((IndexError, ValueError), match=re.escape(str(dim))):
        tile(x, LAYOUT, dim=dim)


@pytest.mark.parametrize("untile", [grid_mod.untile, nabla_attn.untile], ids=["grid.untile", "nabla_attn.untile"])
def test_untile_dim_out_of_range_raises(untile):
    x = torch.randn(1152, 2, 2, 1152)
    with pytest.raises((IndexError, ValueError), match="4"):
        untile(x, LAYOUT, dim=4)


# ----------------------------------------------------------------------------------- accepted
def test_numpy_numbers_are_accepted():
    """np.float32 threshold, np.int64 text_tokens and window entries, np.int32 grid sizes, np.int64
    query_block, np.float64 scale: accepted, and the same result as Python numbers of the same value."""
    text = 5
    q, k, v = (t(seq=S + text) for _ in range(3))
    grid = VideoGrid(np.int32(3), np.int32(13), np.int32(22))
    assert grid == GRID and all(type(x) is int for x in (grid.frames, grid.height, grid.width))
    th = np.float32(0.7)
    got, m = nabla_attention(q, k, v, grid, th, (np.int64(1), np.int64(3), np.int32(3)), np.int64(text), "start",
                             query_block=np.int64(128), scale=np.float64(0.2), backend="reference", return_mask=True)
    want, m_py = nabla_attention(q, k, v, GRID, float(th), (1, 3, 3), text, "start", query_block=128, scale=0.2,
                                 backend="reference", return_mask=True)
    assert torch.equal(got, want) and torch.equal(m.dense(), m_py.dense())
    assert m.layout == m_py.layout and type(m.layout.text_tokens) is int
    assert MaskSpec(np.float32(0.7)).cut == MaskSpec(0.7).cut
    assert torch.equal(nabla_mask(q, k, GRID, np.float32(0.7), text_tokens=text).dense(),
                       nabla_mask(q, k, GRID, 0.7, text_tokens=text).dense())


def test_deprecated_layout_keyword_warns_and_works():
    with pytest.warns(DeprecationWarning, match=r"nabla_attention\(layout=\.\.\.\) is deprecated: use token_order="):
        out = nabla_attention(X, X, X, GRID, 0.5, layout="natural", backend="reference")
    assert torch.equal(out, nabla_attention(X, X, X, GRID, 0.5, backend="reference"))
    lay = LAYOUT
    with pytest.warns(DeprecationWarning):
        til = nabla_attention(nabla_attn.tile(X, lay), nabla_attn.tile(X, lay), nabla_attn.tile(X, lay), GRID, 0.5,
                              layout="tiled", token_order="tiled", backend="reference")  # agreeing: fine
    assert torch.equal(nabla_attn.untile(til, lay), out)


def test_other_accepted_inputs():
    """A finite negative scale runs (softmax of negated scores); a window given as a list is a tuple."""
    q, k, v = (t(dtype=torch.float64) for _ in range(3))
    out = nabla_attention(q, k, v, GRID, 1.0, scale=-0.5, backend="reference")
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, scale=-0.5)) < 1e-12
    assert torch.equal(nabla_mask(q, k, GRID, 0.5, [1, 3, 3]).dense(), nabla_mask(q, k, GRID, 0.5, (1, 3, 3)).dense())


def test_valid_inputs_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nabla_attention(X, X, X, GRID, 0.5, backend="reference")


# ------------------------------------------------------------------------ documented, not errors
def test_nan_in_q_or_k_propagates_visibly():
    """Non-finite block probabilities keep the whole row, so NaN reaches the affected outputs."""
    q, k, v = t(), t(), t()
    k[0, 0, 100] = float("nan")
    out, m = nabla_attention(q, k, v, GRID, 0.3, backend="reference", return_mask=True)
    assert torch.isnan(out[0, 0]).all() and m.dense()[0, 0].all()
    assert torch.isfinite(out[0, 1]).all()  # the other head is untouched
    q, k = t(), t()
    q[0, 1, 3] = float("inf")
    out = nabla_attention(q, k, v, GRID, 0.3, backend="reference")
    assert torch.isnan(out[0, 1, 3]).all() and torch.isfinite(out[0, 0]).all()
    assert torch.isfinite(out[0, 1, :3]).all() and torch.isfinite(out[0, 1, 4:]).all()  # other queries are not hit


@pytest.mark.parametrize("text,pos", [(0, "end"), (70, "start")])
def test_threshold_one_is_exact_dense(text, pos):
    q, k, v = (t(seq=S + text, dtype=torch.float64) for _ in range(3))
    out, m = nabla_attention(q, k, v, GRID, 1.0, None, text, pos, backend="reference", return_mask=True)
    assert m.dense().all()
    assert max_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("threshold", [1e-8, 1e-9, 1e-30, 5e-324])
@pytest.mark.parametrize("query_block", [64, 128])
def test_tiny_thresholds_keep_each_rows_largest_block(threshold, query_block):
    q, k = t(H=3) * 3, t(H=3) * 3
    kept = nabla_mask(q, k, GRID, threshold, query_block=query_block, backend="reference").dense()
    assert kept.any(-1).all()
    if query_block == 64:
        smallest = nabla_mask(q, k, GRID, 1e-3, backend="reference").dense()
        assert torch.all(smallest >= kept)  # monotone: the tiny threshold keeps no more than 1e-3
    out = nabla_attention(q, k, k, GRID, threshold, query_block=query_block, backend="reference")
    assert bool((out.abs().sum(-1) > 0).all())  # no all-zero output row


def test_empty_rows_give_zeros():
    q, k, v = (t(dtype=torch.float64) for _ in range(3))
    kept = nabla_mask(q, k, GRID, 0.5).dense().clone()
    kept[:, :, 4] = False
    kept[:, 1, 0] = False
    m = BlockSparseMask(kept, LAYOUT)
    out = nabla_attention(q, k, v, GRID, mask=m, backend="reference")
    tiled = nabla_attn.tile(out, LAYOUT)
    assert torch.all(tiled[:, :, 4 * 64 : 5 * 64] == 0) and torch.all(tiled[:, 1, :64] == 0)
    assert max_err(out, masked_sdpa(q, k, v, token_mask(m, 1, 2))) < 1e-12


# ------------------------------------------------------------------------------ nabla example
def run_example(args, capsys):
    """``nabla example ARGS``: (exit status, stdout, stderr). Any exception other than SystemExit
    propagates: that is the traceback the command must not print."""
    try:
        rc = cli_main(["example", *args])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# --device cpu everywhere: on a CUDA machine the default device is cuda, where some cases would run.
CLI_CASES = [
    (["--grid", "5x30", "--device", "cpu"], r"--grid must look like 5x30x52, got '5x30'"),
    (["--grid", "axbxc", "--device", "cpu"], r"--grid must look like 5x30x52, got 'axbxc'"),
    (["--grid", "0x8x8", "--device", "cpu"], r"VideoGrid\.frames must be an integer >= 1, got 0"),
    (["--grid", "2x8x8", "--device", "cpu", "--threshold", "2"], THRESHOLD + r"2\.0"),
    (["--grid", "2x8x8", "--device", "cpu", "--threshold", "0"], THRESHOLD + r"0\.0"),
    (["--grid", "2x8x8", "--device", "cpu", "--threshold", "nan"], THRESHOLD + "nan"),
    (["--grid", "2x8x8", "--device", "cpu", "--sta-window", "2x3x3"], WINDOW + r"\(2, 3, 3\)"),
    (["--grid", "2x8x8", "--device", "cpu", "--sta-window", "1x1"], r"--sta-window must look like .*, got '1x1'"),
    (["--grid", "2x8x8", "--device", "cpu", "--heads", "0"], r"--heads .* must be >= 1, got 0"),
    (["--grid", "2x8x8", "--device", "cpu", "--head-dim", "0"], r"--head-dim must be >= 1, got .*0"),
    (["--grid", "2x8x8", "--device", "cpu", "--heads", "-3"], r"--heads .* must be >= 1, got -3"),
    (["--grid", "2x8x8", "--device", "cpu", "--head-dim", "24", "--backend", "flex"], r"backend='flex' cannot run head_dim 24 .*fallback"),
    (["--grid", "2x8x8", "--device", "cpu", "--backend", "triton"], r"backend='triton' cannot run .*; fallback: backend='flex' or 'reference'"),
    pytest.param(["--grid", "2x8x8", "--device", "cuda"], r"--device cuda: no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    pytest.param(["--grid", "2x8x8", "--device", "foo"], r"--device.*'?foo"),
    pytest.param(["--grid", "2x8x8", "--device", "meta"], r"--device.*meta"),
]


@pytest.mark.parametrize("args,match", CLI_CASES, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_example_bad_arguments_exit_2_with_one_error_line(args, match, capsys):
    rc, out, err = run_example(args, capsys)
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"(nabla example: )?error: .+", lines[0]), lines[0]
    assert re.search(match, lines[0]), lines[0]


def test_example_argparse_errors_exit_2(capsys):
    """A value argparse itself rejects: its usage lines, then one error line, status 2."""
    rc, out, err = run_example(["--heads", "x"], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert re.fullmatch(r"nabla example: error: argument --heads: invalid int value: 'x'", err.strip().splitlines()[-1])
