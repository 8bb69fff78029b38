"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): ``blocks[i].attn1`` is video-only self-attention with
RoPE; ``attn2`` (text and, for I2V, image cross-attention) stays dense."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, _get_qkv_projections

from ..grid import VideoGrid
from ._core import Family, NablaProcessorBase, timestep_value


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``[B, S, H, D]``: channel pairs (2i, 2i+1) rotate by the angle whose cos/sin sit
    at 2i (cos) and 2i+1 (sin) of the precomputed ``[1, S, 1, D]`` tables (computed in their dtype,
    float64 on most devices, like the model)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class WanNablaProcessor(NablaProcessorBase):
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Dense steps, and any call that is not plain self-attention, run the original processor.
        if (
            not self.state.sparse_now
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.add_k_proj is not None
            or kwargs
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rope_interleaved(query, *rotary_emb)
            key = _rope_interleaved(key, *rotary_emb)
        out = self.sparse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0, "end")
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(model.blocks)]


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    x = bound.arguments["hidden_states"]  # [B, C, F, H, W] latents
    if x.dim() != 5:
        raise ValueError(f"WanTransformer3DModel: expected 5-D latents [B, C, F, H, W], got shape {tuple(x.shape)}")
    pt, ph, pw = model.config.patch_size
    grid = VideoGrid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    return grid, x.shape[0], timestep_value(bound.arguments.get("timestep"))


FAMILY = Family(
    name="wan",
    model_class=WanTransformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=WanNablaProcessor,
    original_processor_names=("WanAttnProcessor",),
)
