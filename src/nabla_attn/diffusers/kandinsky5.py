"""Kandinsky 5 (``Kandinsky5Transformer3DModel``: T2V Lite / Pro, I2V): ``visual_transformer_blocks[i]
.self_attention`` is video-only self-attention and goes sparse. The text encoder blocks' self-attention
and the video->text ``cross_attention`` stay dense.

Kandinsky ships NABLA itself: its pipelines pass ``sparse_params`` (``P``, an STA mask, ``to_fractal``)
and the model then keeps its tokens in *fractal* order from the first visual block to the last. That
order is exactly our tiled order (one frame x 8x8 tile per 64-token block, tiles frame-major), so
with ``to_fractal`` our processor calls ``nabla_attention(..., token_order="tiled")`` and never
permutes. Without ``sparse_params`` (``attention_type="regular"`` checkpoints) tokens are in natural
order and NABLA tiles per layer, at any grid. diffusers' own path needs ``set_attention_backend("flex")``
and is sparse only when flex_attention runs compiled; ours needs neither.

Settings: ``NablaConfig.from_model`` maps the checkpoint's ``attention_P`` and ``attention_w{T,H,W}``
(``apply_nabla(pipe)`` without a config does so); the ``sparse_params`` of each call only tell the
token order. diffusers builds and ORs the STA mask whatever ``attention_add_sta`` says, so we do too."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Transformer3DModel

from ..constants import TILE
from ..grid import VideoGrid
from ._config import NablaConfig
from ._core import Family, NablaProcessorBase, timestep_value


def _rope_bf16(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Kandinsky 5's RoPE: rotation matrices ``[..., D/2, 2, 2]`` applied in float32, the result rounded
    to bfloat16 whatever the model's dtype (as diffusers' processor does), then back to ``x``'s dtype."""
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * x_).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16).type_as(x)


def fractal(sparse_params: dict[str, Any] | None) -> bool:
    """Whether the model runs its visual blocks in fractal (tiled) token order for this call."""
    return bool(sparse_params is not None and sparse_params.get("to_fractal", False))


class Kandinsky5NablaProcessor(NablaProcessorBase):
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        sparse_params: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if not self.state.sparse_now or encoder_hidden_states is not None:
            # Dense steps: the original without Kandinsky's BlockMask, i.e. dense attention (the only
            # thing its mask gives outside compiled flex, and SDPA cannot take a BlockMask at all).
            return self.original(attn, hidden_states, encoder_hidden_states, rotary_emb, None)
        heads = attn.num_heads
        query = attn.to_query(hidden_states).unflatten(-1, (heads, -1))  # [B, S, H, D]
        key = attn.to_key(hidden_states).unflatten(-1, (heads, -1))
        value = attn.to_value(hidden_states).unflatten(-1, (heads, -1))
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query, key = _rope_bf16(query, rotary_emb), _rope_bf16(key, rotary_emb)
        out = self.sparse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0, "end",
                          tiled=fractal(sparse_params))  # fmt: skip
        return attn.out_layer(out.transpose(1, 2).flatten(-2, -1))


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"visual_transformer_blocks.{i}.self_attention", b.self_attention)
            for i, b in enumerate(model.visual_transformer_blocks)]  # fmt: skip


def kandinsky_grid(model: torch.nn.Module, x: torch.Tensor, tiled: bool) -> VideoGrid:
    """The token grid of channels-last latents ``[B, T, H, W, C]``; fractal order needs whole tiles."""
    if x.dim() != 5:
        raise ValueError(f"{type(model).__name__}: expected 5-D latents [B, T, H, W, C], got {tuple(x.shape)}")
    pt, ph, pw = model.config.patch_size
    grid = VideoGrid(x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)
    if tiled and (grid.height % TILE or grid.width % TILE):
        raise ValueError(
            f"{type(model).__name__}: fractal token order (sparse_params['to_fractal']) needs a token grid whose "
            f"height and width are multiples of {TILE}, got {grid.height}x{grid.width}; pass sparse_params=None "
            "to run in natural order (NABLA then handles any grid)"
        )
    return grid


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    x = bound.arguments["hidden_states"]
    grid = kandinsky_grid(model, x, fractal(bound.arguments.get("sparse_params")))
    return grid, x.shape[0], timestep_value(bound.arguments.get("timestep"))


def odd_window(window: tuple[int, int, int]) -> tuple[int, int, int]:
    """Kandinsky's STA keeps ``|d| <= w // 2``: an even size acts as the next odd one."""
    return tuple(2 * (int(w) // 2) + 1 for w in window)  # type: ignore[return-value]


def _model_config(model: torch.nn.Module) -> NablaConfig | None:
    c = model.config
    if c.attention_type != "nabla":
        return None
    if c.attention_P is None:
        raise ValueError("Kandinsky5Transformer3DModel has attention_type='nabla' but no attention_P")
    sizes = (c.attention_wT, c.attention_wH, c.attention_wW)
    window = None if any(w is None for w in sizes) else odd_window(sizes)
    return NablaConfig(threshold=float(c.attention_P), sta_window=window, query_block=64)


FAMILY = Family(
    name="kandinsky5",
    model_class=Kandinsky5Transformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=Kandinsky5NablaProcessor,
    original_processor_names=("Kandinsky5AttnProcessor",),
    model_config=_model_config,
)
