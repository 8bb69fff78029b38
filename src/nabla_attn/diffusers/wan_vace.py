"""Wan VACE (``WanVACETransformer3DModel``): the same ``WanAttention``/``WanAttnProcessor`` classes as
Wan. Video self-attention runs twice per layer pair: ``vace_blocks[i].attn1`` on the control stream
(same grid and RoPE as the video; all VACE blocks run first) and ``blocks[i].attn1``; every ``attn2``
(text cross-attention) stays dense. Per-layer tiling only: VACE blocks take the control hidden states
beside natural-order video states, which forward-level tiling would have to permute too."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel

from ._core import Family
from .wan import WanNablaProcessor, read_wan_inputs


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    vace = [(f"vace_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.vace_blocks)]
    return vace + [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]


FAMILY = Family(
    name="wan_vace",
    model_class=WanVACETransformer3DModel,
    attention_layers=_layers,
    read_inputs=read_wan_inputs,
    processor_class=WanNablaProcessor,
    original_processor_names=("WanAttnProcessor",),
)
