"""LTX-Video (``LTXVideoTransformer3DModel``): ``transformer_blocks[i].attn1`` is video-only
self-attention with RoPE; latents arrive already packed, so the grid comes from the ``num_frames``,
``height`` and ``width`` arguments the pipeline passes."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoTransformer3DModel, apply_rotary_emb

from ..grid import VideoGrid
from ._core import Family, NablaProcessorBase, timestep_value


class LTXVideoNablaProcessor(NablaProcessorBase):
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.state.sparse_now or encoder_hidden_states is not None or attention_mask is not None or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        out = self.sparse(query, key, value, 0, "end")
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    x = bound.arguments["hidden_states"]  # [B, S, C], already packed
    sizes = {k: bound.arguments.get(k) for k in ("num_frames", "height", "width")}
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        raise ValueError(
            f"LTXVideoTransformer3DModel was called without {missing}; NABLA needs the latent num_frames, "
            "height and width the pipelines pass to find the video grid"
        )
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = VideoGrid(int(sizes["num_frames"]) // pt, int(sizes["height"]) // p, int(sizes["width"]) // p)
    if grid.num_tokens != x.shape[1]:
        raise ValueError(
            f"LTXVideoTransformer3DModel: {x.shape[1]} tokens do not match num_frames/height/width "
            f"{sizes['num_frames']}x{sizes['height']}x{sizes['width']} (patch {pt}x{p}x{p})"
        )
    return grid, x.shape[0], timestep_value(bound.arguments.get("timestep"))


FAMILY = Family(
    name="ltx_video",
    model_class=LTXVideoTransformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=LTXVideoNablaProcessor,
    original_processor_names=("LTXVideoAttnProcessor",),
)
