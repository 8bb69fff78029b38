"""ChronoEdit (``ChronoEditTransformer3DModel``, a Wan 2.1 I2V derivative): ``blocks[i].attn1`` is video
self-attention with a copy of Wan's processor under the same name (identical code); ``attn2`` (text
and image cross-attention) stays dense. The grid is the latents' ``[B, C, F, H, W]`` / ``patch_size``
as in Wan (its temporal-reasoning frames are ordinary frames of that grid)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_chronoedit import ChronoEditTransformer3DModel

from ._core import Family
from .wan import WanNablaProcessor, read_wan_inputs


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]


FAMILY = Family(
    name="chronoedit",
    model_class=ChronoEditTransformer3DModel,
    attention_layers=_layers,
    read_inputs=read_wan_inputs,
    processor_class=WanNablaProcessor,
    original_processor_names=("WanAttnProcessor",),
)
