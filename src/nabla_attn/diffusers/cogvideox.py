"""CogVideoX (``CogVideoXTransformer3DModel``): ``transformer_blocks[i].attn1`` is joint self-attention
over text tokens followed by video tokens; RoPE (5B models) covers the video tokens only."""

from __future__ import annotations

import inspect

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel

from ..grid import VideoGrid
from ._core import Family, NablaProcessorBase, timestep_value


# CogVideoX's ``fuse_qkv_projections`` swaps in its fused processor: both are the model's own.
COGVIDEOX_PROCESSORS = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")


class CogVideoXNablaProcessor(NablaProcessorBase):
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.state.sparse_now or attention_mask is not None:
            # CogVideoX pipelines pass no mask; a custom one is kept exact by the dense original.
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, S, _ = hidden_states.shape
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(B, S, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :text], apply_rotary_emb(query[:, :, text:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :text], apply_rotary_emb(key[:, :, text:], image_rotary_emb)], dim=2)
        out = self.sparse(query, key, value, text, "start")
        out = out.transpose(1, 2).reshape(B, S, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text, S - text], dim=1)
        return out, encoder_out


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    x = bound.arguments["hidden_states"]  # [B, F, C, H, W]
    if x.dim() != 5:
        raise ValueError(f"CogVideoXTransformer3DModel: expected 5-D latents [B, F, C, H, W], got {tuple(x.shape)}")
    p, pt = model.config.patch_size, model.config.patch_size_t
    frames = x.shape[1] if pt is None else -(-x.shape[1] // pt)
    grid = VideoGrid(frames, x.shape[3] // p, x.shape[4] // p)
    return grid, x.shape[0], timestep_value(bound.arguments.get("timestep"))


FAMILY = Family(
    name="cogvideox",
    model_class=CogVideoXTransformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=CogVideoXNablaProcessor,
    original_processor_names=COGVIDEOX_PROCESSORS,
)
