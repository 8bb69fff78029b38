"""Our Triton block-sparse attention kernel, forward and backward, against a float64 reference.

On the CPU the kernels run through Triton's interpreter at small, odd sizes (3x13x22 video tokens +
7 text tokens: ragged edge tiles, a partial text block, an odd number of 64-blocks). The Hopper-only
paths (the Gluon forward, bf16) are tested on the GPU (tests/gpu/, scripts/test_gpu.sh).
"""

from __future__ import annotations

import math

import pytest
import torch

# Must come before anything imports Triton: it switches the CPU interpreter on (triton_interpret.py).
from triton_interpret import DEVICE, only_in_process, rerun_in_fresh_process

pytest.importorskip("triton")

from nabla_attn import TokenLayout, VideoGrid, backends, nabla_attention, tile, untile  # noqa: E402
from nabla_attn.backends.reference import reference_attention  # noqa: E402
from nabla_attn.backends.triton import KernelConfig, ws_eligible  # noqa: E402
from nabla_attn.masks import BlockSparseMask  # noqa: E402

LAYOUT = TokenLayout(VideoGrid(3, 13, 22), 7)
GRID = LAYOUT.grid
TRITON = backends.get("triton")


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


def _attention(q, k, v, mask, scale, cfg=None):  # type: ignore[no-untyped-def]
    return TRITON.attention(q, k, v, mask, None, scale, config=cfg)


# Every launch path: pointer or descriptor (TMA) loads in the forward and in the backward, both tables.
CONFIGS = {
    "q64_tma": (64, KernelConfig()),
    "q64_pointer": (64, KernelConfig(tma=False, bwd_tma=False)),
    "q128_tma": (128, KernelConfig()),
    "q128_pointer_8warps": (128, KernelConfig(tma=False, bwd_tma=False, fwd_warps=8, fwd_stages=3)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_matches_float64(name: str) -> None:
    query_block, cfg = CONFIGS[name]
    B, H, D = (2, 1, 32) if query_block == 64 else (1, 2, 16)
    q, k, v = _inputs(B, H, D, seed=len(name))
    mask = _random_mask(B, H, query_block, seed=3)
    a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
    out = _attention(a, b, c, mask, 0.3, cfg)
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
@pytest.mark.parametrize("scale", [0.3, -0.2, 40.0])
def test_whole_blocks_and_negative_scale(tma: bool, scale: float) -> None:
    """A grid of whole 8x8 tiles has no padding slot, so the kernel skips the validity mask; a
    negative scale cannot fold into exp2 (the row max of the scaled scores is then a min); a large
    scale makes row maxima jump far mid-list."""
    layout = TokenLayout(VideoGrid(3, 8, 16), 0)
    assert not layout.padded
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, generator=g).to(DEVICE) for _ in range(3))
    kept = torch.rand(1, 2, layout.num_blocks, layout.num_blocks, generator=g) < 0.5
    kept[0, 1, 0] = False
    mask = BlockSparseMask(kept.to(DEVICE), layout, 64)
    a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
    out = _attention(a, b, c, mask, scale, KernelConfig(tma=tma, bwd_tma=tma))
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
    q, k, v = _inputs(2, 2, 16, seed=11)
    mask = _random_mask(2, 1, 128, seed=4)  # one table per batch entry, shared by the heads
    out = _attention(q, k, v, mask, 0.25)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 0.25)
    assert _rel(out, ref) < 2e-5


def test_half_precision_error_within_twice_pytorch() -> None:
    """Flash-attention rule in float16: our error <= 2x PyTorch's own masked attention error in that
    dtype, against float64 (bf16, which the interpreter cannot compute, runs in tests/gpu)."""
    dtype = torch.float16
    q, k, v = _inputs(1, 2, 32, seed=12, dtype=dtype)
    mask = _random_mask(1, 2, 64, seed=5)
    out = _attention(q, k, v, mask, 1 / math.sqrt(32))
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
    assert err_torch > 0, "the low-precision reference must differ from float64 for the rule to mean anything"
    assert err <= 2 * err_torch, (float(err), float(err_torch))


def test_nabla_attention_triton_backend_end_to_end() -> None:
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, LAYOUT.seq_len, 16, generator=g).to(DEVICE) for _ in range(3))
    out, mask = nabla_attention(q, k, v, GRID, 0.6, (1, 3, 3), text_tokens=7, backend="triton",
                                query_block=128, return_mask=True)
    ref = nabla_attention(q.double(), k.double(), v.double(), GRID, mask=mask, text_tokens=7, backend="reference")
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-5


def test_natural_order_op_equals_tiled_op_untiled() -> None:
    """The op on natural-order input (``Backend.attention_natural``: the kernel op with ``like=``
    without gradients, attention then untile with them; the Gluon forward, which writes natural
    order in its epilogue, is tested on the GPU) equals the tiled op followed by ``untile`` in the
    ``[B, S, H, D]`` memory diffusers hands over: output, memory layout and gradients, bit for bit."""
    B, H, D = 2, 2, 16
    g = torch.Generator().manual_seed(21)
    leaves = [torch.randn(B, LAYOUT.seq_len, H, D, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in leaves)
    mask = _random_mask(B, H, 64, seed=5, density=0.15)  # sparse: the interpreter is slow
    tiled = [tile(x, LAYOUT) for x in (q, k, v)]
    ref = untile(nabla_attention(*tiled, GRID, mask=mask, text_tokens=7, token_order="tiled", backend="triton"),
                 LAYOUT, like=v)
    with torch.no_grad():
        out = nabla_attention(q, k, v, GRID, mask=mask, text_tokens=7, backend="triton")
    assert out.stride() == v.stride() == ref.stride() and torch.equal(out, ref) and out.abs().sum() > 0
    out = nabla_attention(q, k, v, GRID, mask=mask, text_tokens=7, backend="triton")
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_natural_order_op_registration() -> None:
    """The kernel op with a natural-order output (``like=``): schema, fake implementation (the
    shapes and strides torch.compile sees), autograd registration; its backward refuses, naming why."""
    B, H, D = 1, 2, 16
    g = torch.Generator().manual_seed(23)
    q, k, v = _inputs(B, H, D, seed=23)
    like = torch.randn(B, LAYOUT.seq_len, H, D, generator=g).to(DEVICE).transpose(1, 2)
    mask = _random_mask(B, H, 64, seed=6, density=0.15)
    lists = TRITON.plan(mask)
    args = (q, k, v, lists.counts, lists.indices, mask.kept, list(LAYOUT.key), 64, 0.25, KernelConfig().encode(), like)
    torch.library.opcheck(torch.ops.nabla_attn.triton_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, _ = torch.ops.nabla_attn.triton_attention(q.clone().requires_grad_(), *args[1:])
    assert out.stride() == like.stride()
    with pytest.raises(RuntimeError, match="forward only"):
        out.sum().backward()


def test_edited_mask_is_never_stale() -> None:
    """Nothing is cached on a mask: editing ``kept`` in place changes the next call's result."""
    q, k, v = _inputs(1, 1, 16, seed=15)
    mask = _random_mask(1, 1, 64, seed=7)
    before = _attention(q, k, v, mask, 0.25)
    mask.kept[0, 0, 3] = ~mask.kept[0, 0, 3]
    after = _attention(q, k, v, mask, 0.25)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, 0.25)
    assert _rel(after, ref) < 2e-5 and _rel(before, ref) > 1e-3


def test_unsupported_reasons() -> None:
    from nabla_attn.backends import Request

    def req(dtype=torch.float32, D=32, Dv=32):  # type: ignore[no-untyped-def]
        return Request(torch.device(DEVICE), dtype, D, Dv, False, 64)

    assert TRITON.unsupported(req()) is None
    assert "dtype" in TRITON.unsupported(req(torch.float64))
    assert "head_dim 48" in TRITON.unsupported(req(D=48, Dv=48))
    assert "v head_dim 16 != q head_dim 32" in TRITON.unsupported(req(Dv=16))


def test_rejects_mismatched_mask() -> None:
    q, k, v = _inputs(1, 3, 16, seed=14)
    with pytest.raises(ValueError, match="batch x heads"):
        nabla_attention(q, k, v, GRID, text_tokens=7, token_order="tiled", backend="triton",
                        mask=_random_mask(1, 2, 64, seed=6))


def test_warp_specialized_only_where_it_runs() -> None:
    """The Gluon forward serves sm_90, fp16/bf16, head_dim 64/128 and a positive scale (64-row tables
    unless ``ws_q64`` is off); everything else runs the Triton kernel. Each condition alone turns
    it off."""
    on = KernelConfig()
    hopper = (9, 0)
    assert ws_eligible(torch.bfloat16, 128, 128, 0.1, hopper, on)
    assert ws_eligible(torch.float16, 64, 128, 0.1, hopper, on)
    assert ws_eligible(torch.bfloat16, 128, 64, 0.1, hopper, on)
    assert not ws_eligible(torch.bfloat16, 128, 64, 0.1, hopper, KernelConfig(ws_q64=False))
    assert ws_eligible(torch.bfloat16, 128, 128, 0.1, hopper, KernelConfig(ws_q64=False))
    assert not ws_eligible(torch.bfloat16, 128, 128, -0.1, hopper, on)
    assert not ws_eligible(torch.float32, 128, 128, 0.1, hopper, on)
    assert not ws_eligible(torch.bfloat16, 32, 128, 0.1, hopper, on)
    assert not ws_eligible(torch.bfloat16, 128, 128, 0.1, (8, 0), on)
    assert not ws_eligible(torch.bfloat16, 128, 128, 0.1, (10, 0), on)
    assert not ws_eligible(torch.bfloat16, 128, 128, 0.1, hopper, KernelConfig(warp_specialized=False))


def test_warp_specialized_rejects_a_ring_that_does_not_fit() -> None:
    from nabla_attn.kernels import attention_ws

    big = torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="4 stages needs 288 KiB"):
        attention_ws.forward(big, big, big, big, big, big, 0.1, padded=False, stages=4)
    assert attention_ws.smem_bytes(3, 128, 2) <= attention_ws.SMEM_BYTES


def test_warp_specialized_rejects_lists_that_are_not_its_tables() -> None:
    """The 64-row forward reads union positions with the kv lists' strides: lists shaped for
    another table (here a broadcast table against per-head lists) are refused, naming the shapes."""
    from nabla_attn.kernels import attention_ws

    q = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    kept = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    counts, indices = torch.zeros(1, 2, 2, dtype=torch.int32), torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv lists of its table \(1, 1, 2, 2\), got counts \(1, 2, 2\)"):
        attention_ws.forward(q, q, q, counts, indices, counts, 0.1, padded=False, kept=kept)
    kept = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs the pairs"):
        attention_ws.forward(q, q, q, counts, indices, counts, 0.1, padded=False, kept=kept)
    with pytest.raises(ValueError, match=r"2-row table must be contiguous int32 \(1, 2\), got torch.int64 \(2, 2\)"):
        attention_ws.forward(q, q, q, counts, indices, counts, 0.1, padded=False, kept=kept,
                             pairs=torch.zeros(2, 2, dtype=torch.int64))


def test_kernel_config_round_trip() -> None:
    cfg = KernelConfig(tma=False, ws_stages=2, dq_warps=8)
    assert KernelConfig.decode(cfg.encode()) == cfg


@pytest.mark.parametrize("shape,view", [((2, 3, 7, 19), None), ((1, 2, 6, 6), "one_head"), ((1, 1, 1, 5), None),
                                        ((2, 2, 9, 9), "transposed")])
def test_union_lists_of_row_pairs(shape: tuple[int, int, int, int], view: str | None) -> None:
    """The 64-row Gluon forward's union lists (plain Triton, so the interpreter runs them): for each
    given pair of rows (a random pairing) the ascending union of their kept blocks, and each row's
    own entries located in it, against a Python walk. Odd row counts leave one pair a single row
    (partner -1); a size-1 head dimension, a table with non-unit column stride and an empty row are
    included."""
    from nabla_attn.kernels.attention_ws import union_lists

    g = torch.Generator().manual_seed(sum(shape))
    kept = torch.rand(*shape, generator=g) < 0.35
    kept[0, 0, 0] = False
    kept = kept.to(DEVICE)
    if view == "one_head":
        kept = kept[:, :1]  # read through stride 0
    elif view == "transposed":
        kept = kept.transpose(-1, -2)  # column stride 9
    B, H, nq, _ = kept.shape
    order = torch.randperm(nq, generator=g)
    if nq % 2:
        order = torch.cat([order, torch.tensor([-1])])
    pairs = order.view(-1, 2).to(torch.int32)
    ucnt, uidx, pos = union_lists(kept, pairs.to(DEVICE))
    assert ucnt.shape == (B, H, (nq + 1) // 2)
    for b in range(B):
        for h in range(H):
            for i in range((nq + 1) // 2):
                rows = [r for r in pairs[i].tolist() if r >= 0]
                union = sorted({c for r in rows for c in kept[b, h, r].nonzero().flatten().tolist()})
                assert int(ucnt[b, h, i]) == len(union)
                assert uidx[b, h, i, : len(union)].tolist() == union
                for r in rows:
                    own = kept[b, h, r].nonzero().flatten().tolist()
                    assert pos[b, h, r, : len(own)].tolist() == [union.index(c) for c in own]
