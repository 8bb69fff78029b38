"""Our own Triton block-sparse attention kernel (CUDA). Not written yet: every call says so."""

from __future__ import annotations

import torch

from ..masks import BlockSparseMask


def check_supported(q: torch.Tensor) -> str | None:
    return "the Triton kernel (not built yet)"


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float) -> torch.Tensor:
    raise NotImplementedError("backend='triton' is not built yet; use 'flex' or 'reference'")
