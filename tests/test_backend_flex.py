"""The compiled FlexAttention backend computes exactly the block table (CPU compile; CUDA in benchmarks)."""

import pytest
import torch

from conftest import masked_sdpa, rel_err, token_mask
from nabla_attn import VideoGrid, nabla_attention, nabla_mask
from nabla_attn.backends import flex

pytest.importorskip("torch.nn.attention.flex_attention")
GRID = VideoGrid(3, 13, 22)
TEXT = 7


def inputs(requires_grad=False):
    S = GRID.num_tokens + TEXT
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    q = q + 1.5 * torch.randn(1, 2, 1, 16)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_flex_matches_float64():
    q, k, v = inputs()
    m = nabla_mask(q, k, GRID, threshold=0.5, text_tokens=TEXT, text_position="start")
    assert 0 < m.density < 1
    out = nabla_attention(q, k, v, GRID, text_tokens=TEXT, text_position="start", mask=m, backend="flex")
    ref = masked_sdpa(q.double(), k.double(), v.double(), token_mask(m, 1, 2))
    assert rel_err(out, ref) < 1e-5


def test_flex_backward_on_cpu_is_refused_clearly():
    # FlexAttention has no CPU backward; its GPU backward is checked in benchmarks/validate_gpu.py.
    q, k, v = inputs(requires_grad=True)
    with pytest.raises(ValueError, match="backward pass on CPU.*fallback: backend='reference'"):
        nabla_attention(q, k, v, GRID, 0.5, text_tokens=TEXT, backend="flex")


def test_flex_new_masks_do_not_recompile_and_query_block_128():
    torch._dynamo.reset()
    flex.compiled.cache_clear()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        for threshold in (0.3, 0.6, 0.9):
            q, k, v = inputs()
            out, m = nabla_attention(q, k, v, GRID, threshold, text_tokens=TEXT, backend="flex", query_block=128, return_mask=True)
            ref = masked_sdpa(q.double(), k.double(), v.double(), token_mask(m, 1, 2))
            assert rel_err(out, ref) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_flex_new_layouts_recompile_once_not_per_layout():
    """HunyuanVideo's text length changes with the prompt: each length is a new token layout. The
    flex graph recompiles once with symbolic sizes and then serves every layout, so even a
    recompile limit of 2 is never reached (with static shapes the third layout would fail)."""
    torch._dynamo.reset()
    flex.compiled.cache_clear()
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for text in (3, 9, 21, 40):
            S = GRID.num_tokens + text
            q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
            out, m = nabla_attention(q, k, v, GRID, 0.5, text_tokens=text, backend="flex", return_mask=True)
            ref = masked_sdpa(q.double(), k.double(), v.double(), token_mask(m, 1, 2))
            assert rel_err(out, ref) < 1e-5
