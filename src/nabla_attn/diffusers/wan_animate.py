"""Wan 2.2 Animate (``WanAnimateTransformer3DModel``): ``blocks[i].attn1`` is video self-attention over
the ``(T + 1) x H x W`` grid (reference frame first), with a copy of Wan's processor under the same
name (``transformer_wan_animate.WanAttnProcessor``, identical code). Text/image cross-attention
(``attn2``) and the face adapter's motion cross-attention stay dense."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan_animate import WanAnimateTransformer3DModel

from ._core import Family
from .wan import WanNablaProcessor, read_wan_inputs


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]


FAMILY = Family(
    name="wan_animate",
    model_class=WanAnimateTransformer3DModel,
    attention_layers=_layers,
    read_inputs=read_wan_inputs,
    processor_class=WanNablaProcessor,
    original_processor_names=("WanAttnProcessor",),
)
