"""nabla-attn: Neighborhood Adaptive Block-Level Attention (NABLA) for video diffusion transformers."""

from .attention import mask_from_means, nabla_attention, nabla_mask, nabla_mask_tiled, select_backend, tile, untile
from .constants import BLOCK_TOKENS
from .grid import TokenLayout, VideoGrid
from .masks import BlockSparseMask, MaskSpec, cdf_keep, sta_mask

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # calibrate needs diffusers (an optional extra): resolved on first use, so importing nabla_attn
    # never imports diffusers (hence also not in __all__: a star import would import it).
    if name == "calibrate":
        from .diffusers.calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'nabla_attn' has no attribute {name!r}")

__all__ = [
    "BLOCK_TOKENS",
    "BlockSparseMask",
    "MaskSpec",
    "TokenLayout",
    "VideoGrid",
    "cdf_keep",
    "mask_from_means",
    "nabla_attention",
    "nabla_mask",
    "nabla_mask_tiled",
    "select_backend",
    "sta_mask",
    "tile",
    "untile",
]
