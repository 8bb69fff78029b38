"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): ``blocks[i].attn1`` is video-only self-attention with
RoPE; ``attn2`` (text and, for I2V, image cross-attention) stays dense."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, _get_qkv_projections

from ..attention import tile, untile
from ..grid import VideoGrid
from ._core import Family, NablaProcessorBase, _ModelState, timestep_value


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``[B, S, H, D]``: channel pairs (2i, 2i+1) rotate by the angle whose cos/sin sit
    at 2i (cos) and 2i+1 (sin) of the precomputed ``[1, S, 1, D]`` tables (computed in their dtype,
    like the model). The halves are written straight into an ``x``-dtype result, as diffusers'
    processor does: stacking the float32 halves first cost two extra full-size copies per tensor
    (about 2 ms per Wan 14B 720p block on an H200)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


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


def read_wan_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    """Grid, batch and step timestep of Wan and the models built on its blocks (VACE, Animate,
    ChronoEdit, SkyReels-V2): latents ``[B, C, F, H, W]`` patchified by ``config.patch_size``."""
    x = bound.arguments["hidden_states"]
    if x.dim() != 5:
        raise ValueError(f"{type(model).__name__}: expected 5-D latents [B, C, F, H, W], got shape {tuple(x.shape)}")
    pt, ph, pw = model.config.patch_size
    grid = VideoGrid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    return grid, x.shape[0], timestep_value(bound.arguments.get("timestep"))


def _install_forward_tiling(model: torch.nn.Module, state: _ModelState) -> list[Any]:
    """Tile the first block's hidden states [B, S, C] and every block's RoPE tables [1, S, 1, D]
    (and Wan 2.2 TI2V's per-token modulation [B, S, 6, C]), and untile the last block's output, so
    all blocks run on the tiled sequence. Padding slots carry zero RoPE, so their q and k are exactly 0
    (as NABLA's block means require); their other activations are never read and are dropped at the end."""
    first, last = model.blocks[0], model.blocks[-1]
    signature = inspect.signature(first.forward)

    def make_hook(tile_hidden: bool) -> Any:
        # A hook per role rather than an ``is first`` test: module identity is not reliable under dynamo.
        def hook(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            return tile_inputs(args, kwargs, tile_hidden)

        return hook

    def tile_inputs(args: tuple, kwargs: dict, tile_hidden: bool) -> tuple[tuple, dict] | None:
        if not state.tiled:
            return None
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        layout = state.layout
        if tile_hidden:  # later blocks receive the tiled output of the one before
            a["hidden_states"] = tile(a["hidden_states"], layout, dim=1)
        # The transformer passes the same natural-order RoPE tables / modulation to every block:
        # permute them per block (small next to the hidden states: [S, head_dim] fp32).
        if a.get("rotary_emb") is not None:
            a["rotary_emb"] = tuple(tile(t, layout, dim=1) for t in a["rotary_emb"])
        if a["temb"].dim() == 4:  # per-token timestep projection (TI2V)
            a["temb"] = tile(a["temb"], layout, dim=1)
        return (), dict(a)

    def untile_output(block: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if not state.tiled:
            return None
        return untile(output, state.layout, dim=1)

    handles = [
        block.register_forward_pre_hook(make_hook(i == 0), with_kwargs=True) for i, block in enumerate(model.blocks)
    ]
    handles.append(last.register_forward_hook(untile_output, with_kwargs=True))
    return handles


FAMILY = Family(
    name="wan",
    model_class=WanTransformer3DModel,
    attention_layers=_layers,
    read_inputs=read_wan_inputs,
    processor_class=WanNablaProcessor,
    original_processor_names=("WanAttnProcessor",),
    install_forward_tiling=_install_forward_tiling,
)
