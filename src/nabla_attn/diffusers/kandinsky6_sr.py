"""Kandinsky 6 super-resolution (``Kandinsky6SRTransformer3DModel``): text-free; every
``visual_transformer_blocks[i].self_attention`` is video self-attention in fractal (= our tiled)
order, which the model always uses and which needs a token grid in whole 8x8 tiles (the model
raises otherwise). diffusers' processor always dispatches to flex_attention with its BlockMask and
is sparse only when compiled; ours runs ``nabla_attention(..., token_order="tiled")`` directly.

``NablaConfig.from_model`` gives ``threshold=nabla_threshold`` and ``sta_window=nabla_window``
(``apply_nabla`` without a config uses them). Dense steps (``dense_steps``) run the model's own
processor, i.e. its flex NABLA path."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.transformers.transformer_kandinsky6_sr import Kandinsky6SRTransformer3DModel, apply_rotary

from ..grid import VideoGrid
from ._config import NablaConfig
from ._core import Family, NablaProcessorBase, timestep_value
from .kandinsky5 import kandinsky_grid, odd_window


class Kandinsky6SRNablaProcessor(NablaProcessorBase):
    # The attention module calls its processor positionally: (attn, hidden_states, rotary_emb, sparse_params).
    def __call__(
        self, attn: torch.nn.Module, hidden_states: torch.Tensor, rotary_emb: torch.Tensor, sparse_params: dict[str, Any]
    ) -> torch.Tensor:
        if not self.state.sparse_now:
            return self.original(attn, hidden_states, rotary_emb, sparse_params)
        heads = attn.num_heads
        query = attn.to_query(hidden_states).unflatten(-1, (heads, -1))  # [B, S, H, D]
        key = attn.to_key(hidden_states).unflatten(-1, (heads, -1))
        value = attn.to_value(hidden_states).unflatten(-1, (heads, -1))
        query = apply_rotary(attn.query_norm(query.float()).type_as(query), rotary_emb)
        key = apply_rotary(attn.key_norm(key.float()).type_as(key), rotary_emb)
        out = self.sparse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0, "end", tiled=True)
        return attn.out_layer(out.transpose(1, 2).flatten(2, 3))


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"visual_transformer_blocks.{i}.self_attention", b.self_attention)
            for i, b in enumerate(model.visual_transformer_blocks)]  # fmt: skip


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    x = bound.arguments["hidden_states"]
    return kandinsky_grid(model, x, tiled=True), x.shape[0], timestep_value(bound.arguments.get("timestep"))


def _model_config(model: torch.nn.Module) -> NablaConfig:
    c = model.config
    return NablaConfig(threshold=float(c.nabla_threshold), sta_window=odd_window(c.nabla_window), query_block=64)


FAMILY = Family(
    name="kandinsky6_sr",
    model_class=Kandinsky6SRTransformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=Kandinsky6SRNablaProcessor,
    original_processor_names=("Kandinsky6SRAttnProcessor",),
    model_config=_model_config,
)
