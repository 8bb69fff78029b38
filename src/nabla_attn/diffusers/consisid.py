"""ConsisID (``ConsisIDTransformer3DModel``, built on CogVideoX): ``transformer_blocks[i].attn1`` runs
CogVideoX's processor on text tokens followed by video tokens, RoPE on the video tokens only. The
identity-preserving face cross-attention (``perceiver_cross_attention``, its own modules) stays dense.
No temporal patching: the grid is ``F x H/p x W/p`` of the ``[B, F, C, H, W]`` latents."""

from __future__ import annotations

import inspect

import torch
from diffusers.models.transformers.consisid_transformer_3d import ConsisIDTransformer3DModel

from ..grid import VideoGrid
from ._core import Family, timestep_value
from .cogvideox import COGVIDEOX_PROCESSORS, CogVideoXNablaProcessor


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    x = bound.arguments["hidden_states"]  # [B, F, C, H, W]
    if x.dim() != 5:
        raise ValueError(f"ConsisIDTransformer3DModel: expected 5-D latents [B, F, C, H, W], got {tuple(x.shape)}")
    p = model.config.patch_size
    return VideoGrid(x.shape[1], x.shape[3] // p, x.shape[4] // p), x.shape[0], timestep_value(bound.arguments.get("timestep"))


FAMILY = Family(
    name="consisid",
    model_class=ConsisIDTransformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=CogVideoXNablaProcessor,
    original_processor_names=COGVIDEOX_PROCESSORS,
)
