"""nabla-attn: Neighborhood Adaptive Block-Level Attention (NABLA) for video diffusion transformers."""

from .attention import nabla_attention, select_backend
from .grid import BLOCK_TOKENS, TokenLayout, VideoGrid, tile, untile
from .masks import BlockSparseMask, cdf_keep, nabla_mask, nabla_mask_tiled, sta_mask

__version__ = "0.1.0"

__all__ = [
    "BLOCK_TOKENS",
    "BlockSparseMask",
    "TokenLayout",
    "VideoGrid",
    "cdf_keep",
    "nabla_attention",
    "nabla_mask",
    "nabla_mask_tiled",
    "select_backend",
    "sta_mask",
    "tile",
    "untile",
]
