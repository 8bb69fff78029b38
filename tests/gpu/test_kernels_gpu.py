"""GPU-only checks: the Gluon forward (sm_90), bf16 under the flash-attention rule, the fused mask
against the eager definition at full size (tf32x3 scores), the natural-order op with the tiling
kernel, flex on CUDA with its backward, and torch.compile through the custom ops."""

from __future__ import annotations

import math

import pytest
import torch

from nabla_attn import MaskSpec, TokenLayout, VideoGrid, backends, nabla_attention, tile, untile
from nabla_attn.backends.reference import reference_attention
from nabla_attn.backends.triton import KernelConfig, warp_specialized
from nabla_attn.masks import BlockSparseMask, reference_mask

TRITON = backends.get("triton")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def local_qk(layout: TokenLayout, heads: int, dim: int, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural-order q, k with local attention structure, as the benchmarks build them: random
    Fourier features of each token's (t, h, w) position whose dot products approximate a Gaussian
    kernel of token distance, a length scale growing with the head index, plus noise. Block maps
    are then far from uniform, as in trained video DiTs."""
    g = layout.grid
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = torch.arange(g.num_tokens, device="cuda")
    pos = torch.stack([n // (g.height * g.width), (n // g.width) % g.height, n % g.width], 1).float()
    h = torch.arange(heads, device="cuda", dtype=torch.float32).view(1, heads, 1, 1)
    ell = torch.cat([1.0 + 0.15 * h, 4.0 + 0.8 * h, 4.0 + 0.8 * h], -2)  # [1, H, 3, 1]
    w = torch.randn(batch, heads, 3, dim, device="cuda", generator=gen) / ell
    b = torch.rand(batch, heads, 1, dim, device="cuda", generator=gen) * 2 * math.pi
    feat = torch.cos(pos @ w + b) * math.sqrt(2.0)  # [B, H, N, D]
    text = torch.randn(batch, heads, layout.text_tokens, dim, device="cuda", generator=gen)
    parts = lambda x: [text, x] if layout.text_position == "start" else [x, text]  # noqa: E731
    q = torch.cat(parts(feat + 0.5 * torch.randn(feat.shape, device="cuda", generator=gen)), 2)
    k = torch.cat(parts(feat + 0.5 * torch.randn(feat.shape, device="cuda", generator=gen)), 2)
    return q, k


def torch_lowp(q, k, v, kept_tok, scale):  # type: ignore[no-untyped-def]
    """PyTorch's own attention on the same masked problem in q's dtype (scores in that dtype)."""
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.softmax(s.float().masked_fill(~kept_tok, float("-inf")), -1).nan_to_num(0.0).to(q.dtype)
    return torch.where(kept_tok.any(-1, keepdim=True), p @ v, torch.zeros_like(v))


def token_table(mask: BlockSparseMask) -> torch.Tensor:
    """Bool [B|1, H|1, tiled_len, tiled_len] over tiled positions (padding keys off)."""
    lay = mask.layout
    return (mask.kept.repeat_interleave(mask.query_block, 2)[:, :, : lay.tiled_len].repeat_interleave(64, 3)
            & lay.valid_tokens(mask.kept.device))


def errors(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    got, want = got.detach(), want.detach()
    d = (got.double() - want.double())[..., valid, :]
    return float(d.abs().max()), float(d.norm() / want.double()[..., valid, :].norm())


@pytest.mark.skipif(not HOPPER, reason="the warp-specialised Gluon kernel runs on sm_90 only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("grid,text", [((3, 13, 22), 7), ((3, 8, 16), 0), ((5, 9, 15), 0)])
@pytest.mark.parametrize("query_block,stages", [(128, 2), (128, 3), (64, 3)])
def test_warp_specialized_forward(dtype: torch.dtype, D: int, grid: tuple[int, int, int], text: int,
                                  query_block: int, stages: int) -> None:
    """The Gluon forward against float64 (flash-attention rule) and, through its log-sum-exp, the
    backward. Grids: 19 blocks (the last program has a half past the end) with padding and a text
    block; whole 8x8 tiles (no per-score mask); padded and even. Lists of odd length end on a half
    step. 64-row tables: the two consumers of a program get lists of different lengths (one empty,
    one full, one ending early), so the producer's interleaving reaches its tail; at 19 and 20
    blocks, each consumer also gets a list whose blocks lie further apart than the ring holds."""
    layout = TokenLayout(VideoGrid(*grid), text)
    B, H, scale = 2, 3, 1 / math.sqrt(D)
    g = torch.Generator().manual_seed(D + text + query_block)
    q, k, v = (tile(torch.randn(B, H, layout.seq_len, D, generator=g), layout).to("cuda", dtype) for _ in range(3))
    per = query_block // 64
    nq = -(-layout.num_blocks // per)
    kept = torch.rand(B, H, nq, layout.num_blocks, generator=g) < 0.4
    kept[0, 0, 1] = False  # an empty row: output exactly 0
    kept[1, 2, 0] = True  # a full row
    kept[0, 1, :, 0] = False  # long lists and a row keeping only its last block
    kept[0, 1, 0, :-1] = False
    kept[0, 1, 0, -1] = True
    # A full row beside a one-block row in one program (at 64 rows the layout pairs the same tile of
    # two frames).
    pairs = layout.table("query_pairs").tolist()
    p0, p1 = pairs[0] if query_block == 64 else (0, 1)
    kept[1, 1, p0] = True
    kept[1, 1, p1] = False
    kept[1, 1, p1, 5] = True
    ring = 2 * stages  # one-block slots of the 64-row kernel
    if query_block == 64 and layout.num_blocks > 2 * (ring + 1):
        # One row of a pair keeps every block, the other one block in every ring + 1: between its
        # own blocks the ring wraps, so its consumer must finish a block before it may wait for the
        # next (the kernel's far branch), in the first consumer of one program and the second of
        # another.
        for (b, h), pair, sparse in (((0, 2), 1, 1), ((1, 0), 2, 0)):
            rows = pairs[pair]
            assert -1 not in rows, rows
            kept[b, h, rows[1 - sparse]] = True
            kept[b, h, rows[sparse]] = False
            kept[b, h, rows[sparse], :: ring + 1] = True
    mask = BlockSparseMask(kept.cuda(), layout, query_block)
    ws = KernelConfig(warp_specialized=True, ws_stages=stages)
    assert warp_specialized(q, query_block, scale, ws)

    grads = {}
    for name, cfg in (("ws", ws), ("triton", KernelConfig(warp_specialized=False))):
        a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
        out = TRITON.attention(a, b, c, mask, None, scale, config=cfg)
        out.backward(torch.ones_like(out))
        grads[name] = (out.detach(), a.grad, b.grad, c.grad)
    a64, b64, c64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(a64, b64, c64, mask, scale)
    ref.backward(torch.ones_like(ref))

    valid = layout.valid_tokens("cuda")
    out = grads["ws"][0]
    err, _ = errors(out, ref, valid)
    err_torch, _ = errors(torch_lowp(q, k, v, token_table(mask), scale), ref, valid)
    assert torch.isfinite(out).all()
    assert err <= 2 * err_torch, (err, err_torch)
    assert out[0, 0, query_block:2 * query_block].abs().max() == 0
    # The backward reads the forward's output and log-sum-exp: the gradients must be as good as
    # those from the Triton forward.
    for i, want in ((1, a64.grad), (2, b64.grad), (3, c64.grad)):
        e_ws, e_tr = (errors(grads[n][i], want, valid)[1] for n in grads)
        assert e_ws <= 1.5 * e_tr + 1e-3, (i, e_ws, e_tr)


@pytest.mark.parametrize("query_block", [64, 128])
@pytest.mark.parametrize("ws", [False, True])
def test_bf16_forward_and_backward_within_twice_pytorch(query_block: int, ws: bool) -> None:
    """Flash-attention rule in bf16 for the output and every gradient: our max error against float64
    at most 2x that of PyTorch's own bf16 attention (with autograd) on the same masked problem."""
    if ws and not HOPPER:
        pytest.skip("the Gluon forward runs on sm_90 only")
    layout = TokenLayout(VideoGrid(4, 19, 27), 33)
    B, H, D, scale = 2, 4, 128, 1 / math.sqrt(128)
    g = torch.Generator().manual_seed(query_block)
    q, k, v = (tile(torch.randn(B, H, layout.seq_len, D, generator=g), layout).to("cuda", torch.bfloat16)
               for _ in range(3))
    nq = -(-layout.num_blocks // (query_block // 64))
    mask = BlockSparseMask((torch.rand(B, H, nq, layout.num_blocks, generator=g) < 0.3).cuda(), layout, query_block)
    cfg = KernelConfig(warp_specialized=ws)
    dout = torch.randn_like(q)
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    out = TRITON.attention(*ours, mask, None, scale, config=cfg)
    out.backward(dout)
    low = [x.clone().requires_grad_() for x in (q, k, v)]
    out_low = torch_lowp(*low, token_table(mask), scale)
    out_low.backward(dout)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*exact, mask, scale)
    ref.backward(dout.double())
    valid = layout.valid_tokens("cuda")
    for name, got, lowp, want in zip(("out", "dq", "dk", "dv"), (out, *(x.grad for x in ours)),
                                     (out_low, *(x.grad for x in low)), (ref, *(x.grad for x in exact))):
        err, err_torch = errors(got, want, valid)[0], errors(lowp, want, valid)[0]
        assert err <= 2 * err_torch + 1e-6, (name, err, err_torch)


@pytest.mark.parametrize("query_block", [64, 128])
@pytest.mark.parametrize("ws", [False, True])
def test_natural_order_output_equals_untiled(query_block: int, ws: bool) -> None:
    """The Gluon forwards' natural-order epilogue (a forward-only call on natural-order input: no
    untiling pass) against the tiled output untiled, bit for bit, output and [B, S, H, D] memory
    layout; with gradients, and on the Triton forward, the path untiles, and output and gradients
    match again. Padded edge tiles and a text block at the start, so padding rows are skipped and
    text rows land first."""
    if ws and not HOPPER:
        pytest.skip("the Gluon forward runs on sm_90 only")
    layout = TokenLayout(VideoGrid(5, 21, 35), 40, "start")
    B, H, D, scale = 2, 3, 128, 1 / math.sqrt(128)
    g = torch.Generator().manual_seed(query_block + ws)
    leaves = [torch.randn(B, layout.seq_len, H, D, generator=g).to("cuda", torch.bfloat16).requires_grad_()
              for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in leaves)
    nq = -(-layout.num_blocks // (query_block // 64))
    mask = BlockSparseMask((torch.rand(B, H, nq, layout.num_blocks, generator=g) < 0.3).cuda(), layout, query_block)
    cfg = KernelConfig(warp_specialized=ws)
    assert warp_specialized(q, query_block, scale, cfg) == ws
    tiled = [tile(x, layout) for x in (q, k, v)]
    ref = untile(TRITON.attention(*tiled, mask, None, scale, config=cfg), layout, like=v)
    with torch.no_grad():
        out = TRITON.attention_natural(*tiled, mask, None, scale, like=v, config=cfg)
    assert out.stride() == v.stride() == ref.stride()
    assert torch.equal(out, ref) and out.abs().sum() > 0
    out = TRITON.attention_natural(*tiled, mask, None, scale, like=v, config=cfg)
    assert torch.equal(out, ref)
    go = torch.randn(out.shape, generator=g).to("cuda", torch.bfloat16)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        assert torch.equal(a, b) and a.abs().sum() > 0


@pytest.mark.parametrize("query_block", [64, 128])
def test_fused_mask_matches_the_definition_at_wan_720p(query_block: int) -> None:
    """The fused builder (tf32x3 scores, bisection on bit patterns) against the eager definition on
    Wan 14B 720p-shaped q, k (21x40x80, 40 heads): entries may differ only at the cut, at most
    1e-5 of the table."""
    layout = TokenLayout(VideoGrid(21, 40, 80))
    q, k = local_qk(layout, 40, 128)
    qt, kt = tile(q, layout).bfloat16(), tile(k, layout).bfloat16()
    densities = []
    for threshold in (0.7, 0.95, 0.995):
        spec = MaskSpec(threshold, None, query_block)
        fused = TRITON.build_mask(qt, kt, layout, spec)[0].kept
        eager = reference_mask(qt, kt, layout, spec).kept
        differ = int((fused != eager).sum())
        assert differ <= 1e-5 * eager.numel(), (threshold, differ, eager.numel())
        densities.append(float(eager.float().mean()))
    # The inputs must make the cut matter: sparse to fairly dense tables.
    assert densities[0] < 0.2 and densities[-1] > 0.2, densities


@pytest.mark.parametrize("query_block", [64, 128])
def test_natural_order_op_with_the_tiling_kernel(query_block: int) -> None:
    """The public op on [B, S, H, D]-memory views (as diffusers hands them over): the tiling kernel
    writes the block means, the output takes v's memory layout, and the result equals the float64
    reference on the op's own mask (flash-attention rule)."""
    layout = TokenLayout(VideoGrid(5, 21, 35), 40, "start")
    B, H, D = 2, 6, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, layout.seq_len, H, D, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    out, mask = nabla_attention(q, k, v, layout.grid, 0.6, (1, 3, 3), 40, "start", query_block=query_block,
                                return_mask=True)
    assert out.stride() == v.stride()
    eager = nabla_attention(q, k, v, layout.grid, 0.6, (1, 3, 3), 40, "start", query_block=query_block,
                            backend="reference", return_mask=True)[1]
    assert int((mask.kept != eager.kept).sum()) <= max(1, 1e-4 * mask.kept.numel())
    qt, kt, vt = (tile(x, layout) for x in (q, k, v))
    scale = 1 / math.sqrt(D)
    ref = reference_attention(qt.double(), kt.double(), vt.double(), mask, scale)
    valid = layout.valid_tokens("cuda")
    err = errors(tile(out, layout), ref, valid)[0]
    err_torch = errors(torch_lowp(qt, kt, vt, token_table(mask), scale), ref, valid)[0]
    assert err <= 2 * err_torch, (err, err_torch)


def test_flex_on_cuda_forward_and_backward() -> None:
    layout = TokenLayout(VideoGrid(3, 13, 22), 7)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 64, generator=g).cuda() for _ in range(3))
    mask = nabla_attention(q, k, v, layout.grid, 0.5, text_tokens=7, query_block=128, return_mask=True)[1]
    a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
    out = nabla_attention(a, b, c, layout.grid, None, None, 7, mask=mask, backend="flex")
    dout = torch.randn_like(out)
    out.backward(dout)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    ref = nabla_attention(*exact, layout.grid, None, None, 7, mask=mask, backend="reference")
    ref.backward(dout.double())
    for got, want in zip((out, a.grad, b.grad, c.grad), (ref, *(x.grad for x in exact))):
        assert float((got.double() - want).norm() / want.norm()) < 5e-3  # tf32 dots in flex
    m64 = nabla_attention(q, k, v, layout.grid, 0.5, text_tokens=7, return_mask=True)[1]
    with torch.no_grad():
        out64 = nabla_attention(q, k, v, layout.grid, None, None, 7, mask=m64, backend="flex")
        ref64 = nabla_attention(q.double(), k.double(), v.double(), layout.grid, None, None, 7, mask=m64,
                                backend="reference")
    assert float((out64.double() - ref64).norm() / ref64.norm()) < 5e-3


def test_torch_compile_traces_the_op_without_breaks() -> None:
    """Tiling, the fused mask and both kernels as custom ops: one graph, the compiled result equals
    eager, and the backward runs through the compiled graph."""
    grid = VideoGrid(3, 16, 24)

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return nabla_attention(torch.nn.functional.silu(q), k, v, grid, 0.6, query_block=128) * 2.0

    q, k, v = (torch.randn(1, 4, grid.num_tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    explained = torch._dynamo.explain(block)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(block)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, block(q, k, v))
    out.float().square().mean().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
