"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): Wan's architecture with its processor copied as
``SkyReelsV2AttnProcessor`` (same projections, norms and RoPE). ``blocks[i].attn1`` goes sparse;
``attn2`` stays dense. Diffusion forcing with ``num_frame_per_block > 1`` passes a block-causal mask
to ``attn1``: those calls run the original dense processor (NABLA's table has no causal part)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2Transformer3DModel

from ._core import Family
from .wan import WanNablaProcessor, read_wan_inputs


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]


FAMILY = Family(
    name="skyreels_v2",
    model_class=SkyReelsV2Transformer3DModel,
    attention_layers=_layers,
    read_inputs=read_wan_inputs,
    processor_class=WanNablaProcessor,
    original_processor_names=("SkyReelsV2AttnProcessor",),
)
