"""The CPU backend computes exactly the block table: against the float64 masked-SDPA oracle, against
the reference on the same mask, in chunks of any size, forward and backward, and it is what
``backend="auto"`` takes on the CPU only where its benchmark measured it (benchmarks/bench_cpu.py)."""

import pytest
import torch

from conftest import masked_sdpa, max_err, rel_err, token_mask
from nabla_attn import BlockSparseMask, VideoGrid, nabla_attention, nabla_mask, select_backend, tile
from nabla_attn import attention as attention_mod
from nabla_attn.backends import cpu, fused

GRID = VideoGrid(3, 13, 22)  # edge tiles of 5 rows and 6 columns: padding in 4 of 6 blocks per frame


@pytest.fixture(autouse=True)
def _plain_cpu(monkeypatch):
    """A plain CPU (not Triton's interpreter, which some test processes switch on) and no cached choice."""
    monkeypatch.setattr(fused, "_interpreting", lambda: False)
    attention_mod._choose_uncached.cache_clear()
    yield
    attention_mod._choose_uncached.cache_clear()


def qkv(B=2, H=3, text=0, D=16, Dv=None, dtype=torch.float64):
    S = GRID.num_tokens + text
    q, k = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, S, Dv or D, dtype=torch.float64)
    q = q + 1.5 * torch.randn(B, H, 1, D, dtype=torch.float64)  # far from uniform block maps: really sparse
    k = k + torch.randn(B, H, S, D, dtype=torch.float64).cumsum(2) / S**0.5
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("text,pos", [(0, "end"), (7, "end"), (70, "start")])
@pytest.mark.parametrize("query_block", [64, 128])
@pytest.mark.parametrize("threshold,window", [(0.5, None), (0.3, (1, 1, 3))])
def test_matches_float64_oracle(text, pos, query_block, threshold, window):
    q, k, v = qkv(text=text)
    out, m = nabla_attention(q, k, v, GRID, threshold, window, text, pos, backend="cpu", query_block=query_block,
                             return_mask=True)
    assert 0 < m.density < 1
    assert max_err(out, masked_sdpa(q, k, v, token_mask(m, 2, 3))) < 1e-12


@pytest.mark.parametrize("query_block", [64, 128])
def test_float32_equals_reference_on_the_same_mask_in_any_chunking(query_block):
    """Every chunking (one row per chunk; rows longer than a chunk; one chunk) gives the reference's
    answer on every real token (padding query slots have no defined output)."""
    q, k, v = qkv(text=7, dtype=torch.float32)
    m = nabla_mask(q, k, GRID, 0.4, text_tokens=7, query_block=query_block)
    ref = nabla_attention(q, k, v, GRID, text_tokens=7, mask=m, backend="reference")
    assert rel_err(nabla_attention(q, k, v, GRID, text_tokens=7, mask=m, backend="cpu"), ref) < 1e-6
    lay = m.layout
    qt, kt, vt = (tile(x, lay) for x in (q, k, v))
    real = lay.valid_tokens()
    ref_tiled = nabla_attention(qt, kt, vt, GRID, text_tokens=7, mask=m, backend="reference", token_order="tiled")
    for elements in (1, 5 * 32 * 32, 1 << 30):
        got = cpu.cpu_attention(qt, kt, vt, m, 16**-0.5, chunk_elements=elements)
        assert rel_err(got[:, :, real], ref_tiled[:, :, real]) < 1e-6


def test_broadcast_mask_empty_rows_and_other_value_dim():
    q, k, v = qkv(D=16, Dv=24)
    m = nabla_mask(q[:1, :1], k[:1, :1], GRID, 0.5)  # [1, 1, Qb, Kb] serves every batch entry and head
    kept = m.kept.clone()
    kept[..., 2, :] = False  # a query block keeping nothing gives 0, as in every backend
    m = BlockSparseMask(kept, m.layout)
    out = nabla_attention(q, k, v, GRID, mask=m, backend="cpu", scale=0.3)
    allowed = token_mask(m, 2, 3)
    ref = masked_sdpa(q * 0.3 * 16**0.5, k, v, allowed)  # the oracle's default scale is 1/sqrt(16)
    assert out.shape == v.shape and max_err(out, ref) < 1e-12
    assert torch.all(tile(out, m.layout)[:, :, 128:192] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_the_float32_result_rounded_once(dtype):
    q, k, v = (x.to(dtype) for x in qkv(text=7, dtype=torch.float32))
    m = nabla_mask(q, k, GRID, 0.6, text_tokens=7)
    out = nabla_attention(q, k, v, GRID, text_tokens=7, mask=m, backend="cpu")
    out32 = nabla_attention(q.float(), k.float(), v.float(), GRID, text_tokens=7, mask=m, backend="cpu")
    assert out.dtype == dtype and torch.equal(out, out32.to(dtype))


def test_nan_key_reaches_only_rows_that_keep_its_block():
    q, k, v = qkv(B=1, H=1, dtype=torch.float32)
    lay = nabla_mask(q, k, GRID, 0.3).layout
    n = lay.num_blocks
    # Rows of uneven counts in one chunk; block 0 is kept by some rows and skipped by padded ones (a
    # padded slot pointing at a fixed block 0 would carry its NaN into them).
    kept = (torch.rand(n, n) < 0.4) | torch.eye(n, dtype=torch.bool)
    kept[::2, 0] = True
    kept[1::2, 0] = False
    kept[3, :] = True
    m = BlockSparseMask(kept[None, None], lay)
    qt, kt, vt = tile(q, lay), tile(k, lay), tile(v, lay)
    kt[0, 0, 0] = float("nan")
    out = nabla_attention(qt, kt, vt, GRID, mask=m, backend="cpu", token_order="tiled")[0, 0]
    sees_nan = kept[:, 0].repeat_interleave(64) & lay.valid_tokens()  # real queries of rows keeping block 0
    assert torch.isnan(out[sees_nan]).all()
    assert torch.isfinite(out[~sees_nan]).all()


@pytest.mark.parametrize("query_block", [64, 128])
def test_gradients_match_float64_oracle(query_block):
    q, k, v = qkv(B=2, H=2, text=7)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    m = nabla_mask(q32, k32, GRID, 0.5, sta_window=(1, 1, 1), text_tokens=7, text_position="start",
                   query_block=query_block)
    out = nabla_attention(q32, k32, v32, GRID, text_tokens=7, text_position="start", mask=m, backend="cpu")
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    masked_sdpa(q64, k64, v64, token_mask(m, 2, 2)).backward(grad.double())
    for got, want in ((q32.grad, q64.grad), (k32.grad, k64.grad), (v32.grad, v64.grad)):
        assert rel_err(got, want) < 1e-5


def test_custom_op_registration():
    q, k, v = (x.float() for x in qkv(B=1, H=2, text=7))
    m = nabla_mask(q, k, GRID, 0.5, text_tokens=7)
    qt, kt, vt = (tile(x, m.layout).requires_grad_() for x in (q, k, v))
    # Not test_aot_dispatch_*: the backward is eager Python over data-dependent chunks, as the reference's.
    torch.library.opcheck(cpu._cpu_op, (qt, kt, vt, m.kept, list(m.layout.key), 64, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_auto_takes_cpu_only_where_measured():
    x = torch.randn(1, 2, GRID.num_tokens, 16)
    assert select_backend(x) == "cpu"
    assert select_backend(x.bfloat16()) == "cpu"
    assert select_backend(x, needs_grad=True) == "reference"  # its backward was not benchmarked
    assert select_backend(x.double()) == "reference"  # float64 is for oracles, not speed
    assert select_backend(x, v_head_dim=24) == "reference"  # SDPA's flash kernel needs equal head dims
    assert select_backend(x, "cpu", needs_grad=True) == "cpu"
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run tensors on meta \(it runs CPU tensors\); "
                                         r"fallback: backend='reference'"):
        select_backend(x.to("meta"), "cpu")
