"""Our Triton block-sparse attention kernel, forward and backward, against a float64 reference.

On the CPU the kernels run through Triton's interpreter at small, odd sizes (3x13x22 video tokens +
7 text tokens: ragged edge tiles, a partial text block, an odd number of 64-blocks).
"""

from __future__ import annotations

import math

import pytest
import torch

# Must come before anything imports Triton: it switches the CPU interpreter on (triton_interpret.py).
from triton_interpret import DEVICE, only_in_process, rerun_in_fresh_process

pytest.importorskip("triton")

from nabla_attn import TokenLayout, VideoGrid, nabla_attention, tile  # noqa: E402
from nabla_attn.backends.reference import reference_attention  # noqa: E402
from nabla_attn.masks import BlockSparseMask  # noqa: E402

LAYOUT = TokenLayout(VideoGrid(3, 13, 22), 7)
GRID = LAYOUT.grid


def test_in_fresh_process_when_triton_was_imported_first() -> None:
    rerun_in_fresh_process(__file__)


_only_in_process = only_in_process  # autouse fixture, see triton_interpret.py


def _inputs(B: int, H: int, D: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [tile(torch.randn(B, H, LAYOUT.seq_len, D, generator=g), LAYOUT).to(DEVICE, dtype) for _ in range(3)]


def _random_mask(B: int, H: int, query_block: int, seed: int, density: float = 0.4) -> BlockSparseMask:
    g = torch.Generator().manual_seed(seed)
    nq = -(-LAYOUT.num_blocks // (query_block // 64))
    kept = torch.rand(B, H, nq, LAYOUT.num_blocks, generator=g) < density
    kept[0, 0, 1] = False  # an empty row: its output and gradients must be exactly 0
    kept[..., 2, :] = True  # a full row (including the text block)
    return BlockSparseMask(kept.to(DEVICE), LAYOUT, query_block)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    valid = LAYOUT.valid_tokens(x.device)
    x, y = x.detach().double()[..., valid, :], y.detach().double()[..., valid, :]
    return float((x - y).norm() / y.norm())


CONFIGS = {
    "q128": (128, {"tma": False, "bwd_tma": False}),
    "q128_pair_bwd128": (128, {"pair": True, "bwd_tile_m": 128}),
    "q64_tile64": (64, {"tile_m_for_64": 64}),
    "q64_tile128_submask_bwd128": (64, {"tile_m_for_64": 128, "bwd_tile_m": 128}),
    "q64_tma": (64, {"tma": True, "tile_m_for_64": 128}),
    "q64_prefetch": (64, {"prefetch": True, "tma": False}),
    "q64_tma_prefetch": (64, {"prefetch": True}),
    "q128_prefetch_nofold": (128, {"prefetch": True, "fold": False, "tma": False}),
    "q128_tma_nofold": (128, {"fold": False}),
    "q64_tma_pad_branch": (64, {"pad_branch": True}),
    "q64_tma_lazy": (64, {"lazy_rescale": True}),
    "q128_lazy_pair": (128, {"lazy_rescale": True, "pair": True}),
    "q64_tile128_submask_lazy_prefetch": (64, {"tile_m_for_64": 128, "lazy_rescale": True, "prefetch": True}),
    "q64_tile128_submask_prefetch": (64, {"tile_m_for_64": 128, "prefetch": True, "tma": False}),
    "q64_tile128_submask_tma_prefetch": (64, {"tile_m_for_64": 128, "prefetch": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_matches_float64(name: str) -> None:
    from nabla_attn.backends.triton_kernel import KernelConfig, triton_attention

    query_block, cfg = CONFIGS[name]
    B, H, D = (2, 1, 32) if name != "q128" else (1, 2, 16)
    q, k, v = _inputs(B, H, D, seed=len(name))
    mask = _random_mask(B, H, query_block, seed=3)
    a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
    out = triton_attention(a, b, c, mask, 0.3, KernelConfig(**cfg))
    grad = torch.randn_like(out)
    out.backward(grad)
    a64, b64, c64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(a64, b64, c64, mask, 0.3)
    ref.backward(grad.double())
    # float32 with full-precision dots: errors at float32 rounding level.
    for got, want in ((out, ref), (a.grad, a64.grad), (b.grad, b64.grad), (c.grad, c64.grad)):
        assert _rel(got, want) < 2e-5
    # Empty row: output and its query gradient are exactly 0 (not NaN).
    rows = slice(query_block, 2 * query_block)
    assert out[0, 0, rows].abs().max() == 0 and a.grad[0, 0, rows].abs().max() == 0


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("scale", [0.3, -0.2, 40.0])
def test_whole_blocks_and_negative_scale(tma: bool, prefetch: bool, lazy: bool, scale: float) -> None:
    """A grid of whole 8x8 tiles has no padding slot, so the kernel skips the validity mask; a
    negative scale cannot fold into exp2 (the row max of the scaled scores is then a min); a large
    scale makes row maxima jump past float32 range mid-list unless lazy rescaling rescales."""
    from nabla_attn.backends.triton_kernel import KernelConfig, triton_attention

    layout = TokenLayout(VideoGrid(3, 8, 16), 0)
    assert layout.tiled_len == layout.seq_len
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, generator=g).to(DEVICE) for _ in range(3))
    kept = torch.rand(1, 2, layout.num_blocks, layout.num_blocks, generator=g) < 0.5
    kept[0, 1, 0] = False
    mask = BlockSparseMask(kept.to(DEVICE), layout, 64)
    a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
    out = triton_attention(a, b, c, mask, scale, KernelConfig(prefetch=prefetch, tma=tma, lazy_rescale=lazy))
    grad = torch.randn_like(out)
    out.backward(grad)
    a64, b64, c64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(a64, b64, c64, mask, scale)
    ref.backward(grad.double())
    tol = 2e-5 if abs(scale) < 1 else 2e-4  # a large scale amplifies float32 rounding of the scores
    for got, want in ((out, ref), (a.grad, a64.grad), (b.grad, b64.grad), (c.grad, c64.grad)):
        got, want = got.detach().double(), want.detach()
        assert float((got - want).norm() / want.norm()) < tol
    assert torch.all(out[0, 1, :64] == 0)


def test_broadcast_head_mask_and_batch() -> None:
    from nabla_attn.backends.triton_kernel import triton_attention

    q, k, v = _inputs(2, 2, 16, seed=11)
    mask = _random_mask(2, 1, 128, seed=4)  # one table per batch entry, shared by the heads
    out = triton_attention(q, k, v, mask, 0.25)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 0.25)
    assert _rel(out, ref) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_pytorch(dtype: torch.dtype) -> None:
    """Flash-attention rule: our fp16/bf16 error <= 2x PyTorch's own masked attention error in that dtype."""
    from nabla_attn.backends.triton_kernel import KernelConfig, triton_attention

    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter has no bfloat16 arithmetic (numpy): bf16 runs on the GPU only")
    q, k, v = _inputs(1, 2, 32, seed=12, dtype=dtype)
    mask = _random_mask(1, 2, 64, seed=5)
    out = triton_attention(q, k, v, mask, 1 / math.sqrt(32), KernelConfig())
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(32))
    # PyTorch's attention on the same masked problem in the same dtype, token mask from the table.
    kept = mask.kept[0].repeat_interleave(64, 1).repeat_interleave(64, 2) & LAYOUT.valid_tokens(DEVICE)
    has = kept.any(-1, keepdim=True)
    s = (q[0] @ k[0].transpose(-1, -2)) * (1 / math.sqrt(32))  # low-precision scores, as SDPA would
    p = torch.softmax(s.float().masked_fill(~kept, float("-inf")), -1).to(dtype)
    torch_lowp = torch.where(has, p @ v[0], torch.zeros_like(v[0]))[None]
    valid = LAYOUT.valid_tokens(DEVICE)
    err = (out.double() - ref)[..., valid, :].abs().max()
    err_torch = (torch_lowp.double() - ref)[..., valid, :].abs().max()
    assert torch.isfinite(out).all()
    assert err <= 2 * err_torch, (float(err), float(err_torch))


def test_nabla_attention_triton_backend_end_to_end() -> None:
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, LAYOUT.seq_len, 16, generator=g).to(DEVICE) for _ in range(3))
    out, mask = nabla_attention(q, k, v, GRID, 0.6, (1, 3, 3), text_tokens=7, backend="triton",
                                query_block=128, return_mask=True)
    ref = nabla_attention(q.double(), k.double(), v.double(), GRID, mask=mask, text_tokens=7, backend="reference")
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-5


def test_check_supported_reasons() -> None:
    from nabla_attn.backends.triton_kernel import check_supported

    assert check_supported(torch.zeros(1, 1, 64, 32, device=DEVICE)) is None
    assert "dtype" in check_supported(torch.zeros(1, 1, 64, 32, device=DEVICE, dtype=torch.float64))
    assert "head_dim 48" in check_supported(torch.zeros(1, 1, 64, 48, device=DEVICE))


def test_rejects_mismatched_mask() -> None:
    from nabla_attn.backends.triton_kernel import triton_attention

    q, k, v = _inputs(1, 3, 16, seed=14)
    with pytest.raises(ValueError, match="batch x heads"):
        triton_attention(q, k, v, _random_mask(1, 2, 64, seed=6), 0.25)


def _on_hopper() -> bool:
    return DEVICE != "cpu" and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _on_hopper(), reason="the warp-specialised Gluon kernel runs on sm_90 GPUs only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("grid,text", [((3, 13, 22), 7), ((3, 8, 16), 0), ((5, 9, 15), 0)])
@pytest.mark.parametrize("pair", [False, True])
def test_warp_specialized_forward(dtype: torch.dtype, D: int, grid: tuple[int, int, int], text: int,
                                  pair: bool) -> None:
    """The Gluon forward against float64 (flash-attention rule) and, through its log-sum-exp, the
    backward. Grids: 19 blocks (the last 128-row tile has a half past the end) with padding and a
    text block; whole 8x8 tiles (no per-score mask); padded and even. ``pair``: 128-key steps
    (odd lists end on a half step)."""
    from nabla_attn.backends.triton_kernel import KernelConfig, _warp_specialized, triton_attention

    layout = TokenLayout(VideoGrid(*grid), text)
    B, H, scale = 2, 3, 1 / math.sqrt(D)
    g = torch.Generator().manual_seed(D + text)
    q, k, v = (tile(torch.randn(B, H, layout.seq_len, D, generator=g), layout).to(DEVICE, dtype) for _ in range(3))
    nq = -(-layout.num_blocks // 2)
    kept = torch.rand(B, H, nq, layout.num_blocks, generator=g) < 0.4
    kept[0, 0, 1] = False  # an empty row: output exactly 0
    kept[1, 2, 0] = True  # a full row
    kept[0, 1, :, 0] = False  # long lists and a row keeping only its last block
    kept[0, 1, 0, :-1] = False
    kept[0, 1, 0, -1] = True
    mask = BlockSparseMask(kept.to(DEVICE), layout, 128)
    ws = KernelConfig(warp_specialized=True, ws_pair=pair, ws_stages=2 if pair else 4)
    assert _warp_specialized(q, mask, scale, ws)

    grads = {}
    for name, cfg in (("ws", ws), ("triton", KernelConfig())):
        a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
        out = triton_attention(a, b, c, mask, scale, cfg)
        out.backward(torch.ones_like(out))
        grads[name] = (out.detach(), a.grad, b.grad, c.grad)
    a64, b64, c64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(a64, b64, c64, mask, scale)
    ref.backward(torch.ones_like(ref))

    valid = layout.valid_tokens(DEVICE)
    kept_tok = mask.kept.repeat_interleave(128, 2)[:, :, : layout.tiled_len].repeat_interleave(64, 3) & valid
    has = kept_tok.any(-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)) * scale  # PyTorch's own low-precision scores
    p = torch.softmax(s.float().masked_fill(~kept_tok, float("-inf")), -1).nan_to_num(0.0).to(dtype)
    torch_lowp = torch.where(has, p @ v, torch.zeros_like(v))
    out = grads["ws"][0]
    err = (out.double() - ref)[..., valid, :].abs().max()
    err_torch = (torch_lowp.double() - ref)[..., valid, :].abs().max()
    assert torch.isfinite(out).all()
    assert err <= 2 * err_torch, (float(err), float(err_torch))
    assert out[0, 0, 128:256].abs().max() == 0
    # The backward reads the forward's output and log-sum-exp: the gradients must be as good as
    # those from the Triton forward.
    for i, want in ((1, a64.grad), (2, b64.grad), (3, c64.grad)):
        e_ws, e_tr = ((grads[n][i].double() - want)[..., valid, :].norm() / want[..., valid, :].norm() for n in grads)
        assert e_ws <= 1.5 * e_tr + 1e-3, (i, float(e_ws), float(e_tr))


def test_warp_specialized_only_where_it_runs() -> None:
    """The Gluon forward serves Hopper, 128-row tables, fp16/bf16, head_dim 64/128 and a positive
    scale; everything else runs the Triton kernel. A slot ring that does not fit is an error."""
    from nabla_attn.backends.triton_kernel import KernelConfig, _warp_specialized, _ws_forward

    q = torch.zeros(1, 1, LAYOUT.tiled_len, 64, device=DEVICE, dtype=torch.float16)
    ws = KernelConfig()
    assert ws.warp_specialized
    m128, m64 = _random_mask(1, 1, 128, seed=1), _random_mask(1, 1, 64, seed=1)
    if DEVICE == "cpu":
        assert not _warp_specialized(q, m128, 0.1, ws)
    assert not _warp_specialized(q, m64, 0.1, ws)
    assert not _warp_specialized(q, m128, -0.1, ws)
    assert not _warp_specialized(q.float(), m128, 0.1, ws)
    assert not _warp_specialized(q[..., :32], m128, 0.1, ws)
    assert not _warp_specialized(q, m128, 0.1, KernelConfig(warp_specialized=False))
    big = torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ws_stages=4 with ws_pair=True needs 288 KiB"):
        _ws_forward(big, big, big, big, big, big, big, big, False, 0.1, KernelConfig(ws_stages=4))
