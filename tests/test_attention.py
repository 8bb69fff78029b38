import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import masked_sdpa, max_err, rel_err, token_mask
from nabla_attn import VideoGrid, nabla_attention, nabla_mask, select_backend, sta_mask, tile, untile

GRID = VideoGrid(3, 13, 22)


def qkv(B=2, H=3, S=None, D=16, dtype=torch.float64, text=0, structured=True):
    S = S or GRID.num_tokens + text
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    if structured:  # per-head offsets make block maps far from uniform, so masks are really sparse
        q = q + 1.5 * torch.randn(B, H, 1, D, dtype=torch.float64)
        k = k + torch.randn(B, H, S, D, dtype=torch.float64).cumsum(2) / S**0.5
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("text,pos", [(0, "end"), (7, "end"), (7, "start")])
def test_threshold_one_is_plain_sdpa(text, pos):
    q, k, v = qkv(text=text)
    out = nabla_attention(q, k, v, GRID, threshold=1.0, text_tokens=text, text_position=pos, backend="reference")
    assert max_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("text,pos", [(0, "end"), (7, "end"), (7, "start")])
@pytest.mark.parametrize("threshold,window", [(0.5, None), (None, (1, 3, 3)), (0.4, (3, 1, 1))])
@pytest.mark.parametrize("query_block", [64, 128])
def test_sparse_matches_masked_sdpa_float64(text, pos, threshold, window, query_block):
    q, k, v = qkv(text=text)
    out, m = nabla_attention(
        q, k, v, GRID, threshold, window, text, pos, backend="reference", query_block=query_block, return_mask=True
    )
    assert 0 < m.density < 1
    ref = masked_sdpa(q, k, v, token_mask(m, 2, 3))
    assert max_err(out, ref) < 1e-12
    # and it really is sparse attention: dense attention differs
    assert rel_err(F.scaled_dot_product_attention(q, k, v), ref) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_computes_low_precision_in_float32(dtype):
    """The reference upcasts: a bf16/fp16 output is the float32 result rounded once, so each element's
    error against float64 (on the same rounded inputs) is at most half an ulp of the output. (The
    kernels' flash-attention-rule checks run on the GPU and under the interpreter: tests/gpu,
    tests/test_triton_kernel.py.)"""
    q, k, v = qkv(text=7)
    m = nabla_mask(q, k, GRID, threshold=0.6, text_tokens=7)
    allowed = token_mask(m, 2, 3)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out = nabla_attention(ql, kl, vl, GRID, text_tokens=7, mask=m, backend="reference")
    out32 = nabla_attention(ql.float(), kl.float(), vl.float(), GRID, text_tokens=7, mask=m, backend="reference")
    assert out.dtype == dtype and out.shape == v.shape
    assert torch.equal(out, out32.to(dtype))
    ref = masked_sdpa(ql.double(), kl.double(), vl.double(), allowed)
    half_ulp = ref.abs() * torch.finfo(dtype).eps / 2 + 1e-6 * float(ref.abs().max())  # + float32 arithmetic
    assert ((out.double() - ref).abs() <= half_ulp).all()


def test_gradients_match_float64_reference():
    q, k, v = qkv(B=1, H=2, text=7)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    m = nabla_mask(q32, k32, GRID, threshold=0.5, sta_window=(1, 1, 1), text_tokens=7, text_position="start")
    out = nabla_attention(q32, k32, v32, GRID, text_tokens=7, text_position="start", mask=m, backend="reference")
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = masked_sdpa(q64, k64, v64, token_mask(m, 1, 2))
    ref.backward(grad.double())
    for got, want in ((q32.grad, q64.grad), (k32.grad, k64.grad), (v32.grad, v64.grad)):
        assert rel_err(got, want) < 1e-5


def test_tiled_layout_matches_natural():
    q, k, v = qkv(text=70)
    lay = nabla_mask(q, k, GRID, text_tokens=70).layout
    nat = nabla_attention(q, k, v, GRID, 0.5, text_tokens=70, backend="reference")
    til = nabla_attention(tile(q, lay), tile(k, lay), tile(v, lay), GRID, 0.5, text_tokens=70, layout="tiled", backend="reference")
    assert max_err(untile(til, lay), nat) < 1e-12


def test_batch_entries_get_their_own_masks():
    q, k, v = qkv(B=2)
    out, m = nabla_attention(q, k, v, GRID, 0.4, backend="reference", return_mask=True)
    out1 = nabla_attention(q[1:], k[1:], v[1:], GRID, 0.4, backend="reference")
    assert max_err(out[1:], out1) < 1e-12
    assert not torch.equal(m.dense()[0], m.dense()[1])


def test_empty_rows_give_zero():
    q, k, v = qkv(B=1, H=1)
    m = sta_mask(GRID, (1, 1, 1))
    kept = m.dense().clone()
    kept[..., 2, :] = False
    from nabla_attn import BlockSparseMask

    out = nabla_attention(q, k, v, GRID, mask=BlockSparseMask(kept, m.layout), backend="reference")
    lay = m.layout
    assert torch.all(tile(out, lay)[:, :, 128:192] == 0)


def test_nan_reaches_output_visibly():
    q, k, v = qkv(B=1, H=1, dtype=torch.float32)
    k[0, 0, 100] = float("nan")
    out = nabla_attention(q, k, v, GRID, 0.3, backend="reference")
    assert torch.isnan(out).all()  # every query block keeps every key block, the NaN key included
    q, k, v = qkv(B=1, H=1, dtype=torch.float32)
    q[0, 0, 3] = float("nan")
    out = nabla_attention(q, k, v, GRID, 0.3, backend="reference")
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, 4:]).all()


def test_auto_backend_is_visible(caplog):
    # head_dim 20 in float64: a request no other test makes, so its choice is logged here, once.
    q, k, v = (torch.randn(1, 1, GRID.num_tokens, 20, dtype=torch.float64) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="nabla_attn"):
        assert select_backend(q) == "reference"  # CPU
        nabla_attention(q, k, v, GRID)
        nabla_attention(q, k, v, GRID)
    assert sum("chose 'reference'" in r.message for r in caplog.records) == 1


class TestBadInput:
    def test_seq_length_names_grid(self):
        q = torch.randn(1, 2, 100, 16)
        with pytest.raises(ValueError, match=r"seq length 100 .*3x13x22 = 858 video tokens \+ 0 text"):
            nabla_attention(q, q, q, GRID)
        q = torch.randn(1, 2, 858, 16)
        with pytest.raises(ValueError, match="seq length 858 .* 5 text tokens"):
            nabla_attention(q, q, q, GRID, text_tokens=5)

    @pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, float("nan"), True])
    def test_threshold(self, bad):
        q = torch.randn(1, 1, 858, 16)
        with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
            nabla_attention(q, q, q, GRID, threshold=bad)

    @pytest.mark.parametrize("bad", [(2, 3, 3), (11, 3), (0, 3, 3), (-1, 3, 3), "113"])
    def test_sta_window(self, bad):
        q = torch.randn(1, 1, 858, 16)
        with pytest.raises(ValueError, match="positive odd integers"):
            nabla_attention(q, q, q, GRID, threshold=0.5, sta_window=bad)

    def test_shapes(self):
        q = torch.randn(1, 2, 858, 16)
        with pytest.raises(ValueError, match=r"q, k, v shapes do not match: q \(1, 2, 858, 16\), k \(1, 3, 858, 16\)"):
            nabla_attention(q, torch.randn(1, 3, 858, 16), q, GRID)
        with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\], got shape \(2, 858, 16\)"):
            nabla_attention(q, q[0], q, GRID)

    def test_dtypes(self):
        q = torch.randn(1, 2, 858, 16)
        with pytest.raises(TypeError, match="dtypes differ: torch.float32, torch.float16"):
            nabla_attention(q, q.half(), q, GRID)
        with pytest.raises(TypeError, match="dtype torch.int64"):
            nabla_attention(q.long(), q.long(), q.long(), GRID)

    def test_devices(self):
        q = torch.randn(1, 2, 858, 16)
        with pytest.raises(ValueError, match="devices differ: cpu, meta"):
            nabla_attention(q, q.to("meta"), q, GRID)

    def test_backend_and_head_dim(self):
        q = torch.randn(1, 2, 858, 24)
        with pytest.raises(ValueError, match="head_dim 24 .* fallback: backend='reference'"):
            nabla_attention(q, q, q, GRID, backend="flex")
        with pytest.raises(ValueError, match="backend must be one of"):
            nabla_attention(q, q, q, GRID, backend="cuda")
        with pytest.raises(ValueError, match="token_order must be"):
            nabla_attention(q, q, q, GRID, token_order="tiles")
        with pytest.raises(TypeError, match="VideoGrid"):
            nabla_attention(q, q, q, (3, 13, 22))

    def test_mask_for_other_layout(self):
        q = torch.randn(1, 2, 858, 16)
        m = sta_mask(VideoGrid(3, 13, 22), (1, 1, 1), text_tokens=0)
        q2 = torch.randn(1, 2, 860, 16)
        with pytest.raises(ValueError, match="mask was built for"):
            nabla_attention(q2, q2, q2, GRID, text_tokens=2, mask=m)
        del q

    def test_triton_needs_equal_head_dims(self):
        q = torch.randn(1, 2, 858, 16)
        with pytest.raises(ValueError, match="v head_dim 32 != q head_dim 16"):
            select_backend(q, "triton", v_head_dim=32)
