"""The GPU row-permutation kernel behind ``tile``/``untile`` (Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

# Must come before anything imports Triton: it switches the CPU interpreter on (triton_interpret.py).
from triton_interpret import DEVICE, only_in_process, rerun_in_fresh_process

pytest.importorskip("triton")

from nabla_attn import TokenLayout, VideoGrid, backends  # noqa: E402
from nabla_attn.grid import tile, untile  # noqa: E402  (the eager definitions)

KERNEL = backends.get("triton")  # tiles with the row-permutation kernel (here: the interpreter)

_only_in_process = only_in_process  # autouse fixture, see triton_interpret.py

LAYOUT = TokenLayout(VideoGrid(3, 13, 22), 7, "start")  # ragged edge tiles, a partial text block


def test_in_fresh_process_when_triton_was_imported_first() -> None:
    rerun_in_fresh_process(__file__)


def _bshd(B: int, H: int, D: int, seed: int) -> torch.Tensor:
    """A ``[B, H, S, D]`` view of ``[B, S, H, D]`` memory, as diffusers hands q, k, v over."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, LAYOUT.seq_len, H, D, generator=g).to(DEVICE).transpose(1, 2)


@pytest.mark.parametrize("D", [32, 24])
def test_tile_untile_kernel_matches_index_select(D: int) -> None:
    x = _bshd(2, 3, D, seed=D)
    want = tile(x.cpu(), LAYOUT)  # the index_select path
    got, _ = KERNEL.tile(x, LAYOUT)
    assert got.is_contiguous() and torch.equal(got.cpu(), want)
    back = KERNEL.untile(got, LAYOUT, like=x)
    assert back.stride() == x.stride(), "untile writes into the layout of `like`"
    assert torch.equal(back, x)
    assert torch.equal(KERNEL.untile(got, LAYOUT), x.contiguous())
    # 3-D [B, S, C] (hidden states), and the token axis elsewhere ([B, S, 6, C] modulation, dim 1).
    h = x.transpose(1, 2).flatten(2)
    assert torch.equal(KERNEL.tile(h, LAYOUT)[0].cpu(), tile(h.cpu(), LAYOUT))
    m = x.transpose(1, 2).contiguous()
    tiled = KERNEL.tile(m, LAYOUT, dim=1)[0]
    assert tiled.is_contiguous() and torch.equal(tiled.cpu(), tile(m.cpu(), LAYOUT, dim=1))
    assert torch.equal(KERNEL.untile(tiled, LAYOUT, dim=1), m)


def test_tile_untile_kernel_gradients() -> None:
    x = _bshd(1, 2, 16, seed=3).detach().requires_grad_()
    t, _ = KERNEL.tile(x, LAYOUT)
    w = torch.randn_like(t)
    u = KERNEL.untile(t * w, LAYOUT)
    g = torch.randn_like(u)
    u.backward(g)
    x2 = x.detach().clone().requires_grad_()
    untile(tile(x2, LAYOUT) * w, LAYOUT).backward(g)
    assert torch.allclose(x.grad, x2.grad)


def test_untile_like_checks_shape() -> None:
    t = tile(torch.randn(1, 2, LAYOUT.seq_len, 8), LAYOUT)
    with pytest.raises(ValueError, match="like has shape"):
        untile(t, LAYOUT, like=torch.empty(1, 2, LAYOUT.seq_len, 4))
    like = torch.empty(1, LAYOUT.seq_len, 2, 8).transpose(1, 2)
    out = untile(t, LAYOUT, like=like)
    assert out.stride() == like.stride() and torch.equal(out, untile(t, LAYOUT))
