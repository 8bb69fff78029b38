"""Shared test helpers: an independent float64 masked-SDPA oracle built from a mask's block table."""

from __future__ import annotations

import pytest
import torch

from nabla_attn import BLOCK_TOKENS, BlockSparseMask, TokenLayout


def token_mask(mask: BlockSparseMask, batch: int, heads: int) -> torch.Tensor:
    """Bool ``[B, H, S, S]`` over *natural* token order, derived from the block table.

    Written independently of the backends: each natural token's block is looked up through the
    layout's gather index, and pair (i, j) is allowed iff the table keeps (block(i), block(j)).
    """
    layout = mask.layout
    gather = layout.gather_index()
    block_of = torch.empty(layout.seq_len, dtype=torch.long)
    for pos in range(layout.tiled_len):
        tok = int(gather[pos])
        if tok < layout.seq_len:
            block_of[tok] = pos // BLOCK_TOKENS
    qrow = block_of // (mask.query_block // BLOCK_TOKENS)
    kept = mask.dense().expand(batch, heads, -1, -1)
    return kept[:, :, qrow][:, :, :, block_of]


def masked_sdpa(q, k, v, allowed: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Masked attention through PyTorch's SDPA at ``dtype``; rows with no allowed key give 0."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=allowed
    )
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(autouse=True)
def _seed():
    # Fresh inputs per test, yet reproducible: each test reseeds.
    torch.manual_seed(1234)


def layout(frames=3, height=13, width=22, text=0, pos="end") -> TokenLayout:
    from nabla_attn import VideoGrid

    return TokenLayout(VideoGrid(frames, height, width), text, pos)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """tests/gpu/ holds GPU-only tests: skipped with a visible reason where there is no CUDA GPU
    (``scripts/test_gpu.sh`` runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: scripts/test_gpu.sh runs it on one")
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    """What the kernel modules ran in their fresh interpreter processes (tests/triton_interpret.py)."""
    import sys

    module = sys.modules.get("triton_interpret")
    counts = getattr(module, "CHILD_COUNTS", {}) if module is not None else {}
    for name, c in sorted(counts.items()):
        terminalreporter.write_line(f"{name} in a fresh process (Triton interpreter): "
                                    + ", ".join(f"{n} {kind}" for kind, n in c.items()))
