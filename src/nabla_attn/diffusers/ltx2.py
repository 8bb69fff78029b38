"""LTX-2 (``LTX2VideoTransformer3DModel``): video, audio and text are separate streams; only
``transformer_blocks[i].attn1`` (video self-attention) goes sparse. Audio self-attention, the
audio<->video cross-attentions and text cross-attention stay dense.

The latents arrive packed (``[B, N, C]``), so the grid comes from the ``num_frames``, ``height`` and
``width`` arguments the pipelines pass. Tokens beyond the grid (keyframe / reference tokens that the
condition and IC-LoRA pipelines append after the video) are fully attended, like text. Calls NABLA
cannot map run dense: a forward with coordinates only (the DFR pipelines pass ``video_coords`` without
the grid, and tile subsets of it), an ``attn1`` with a self-attention mask (IC-LoRA), and the
spatio-temporal-guidance blocks of LTX-2.3 (``perturbation_mask`` / ``all_perturbed``)."""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2VideoTransformer3DModel,
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)

from ..grid import VideoGrid
from ._core import Family, NablaProcessorBase, timestep_value

log = logging.getLogger("nabla_attn.diffusers")

RopeTables = tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=8)
def _takes_perturbation(cls: type) -> bool:
    return "perturbation_mask" in inspect.signature(cls.__call__).parameters


class LTX2NablaProcessor(NablaProcessorBase):
    # Explicit parameter names: LTX2Attention passes only the keywords the processor's signature names.
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: RopeTables | None = None,
        key_rotary_emb: RopeTables | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | torch.Tensor | None = None,
    ) -> torch.Tensor:
        perturbed = perturbation_mask is not None or (all_perturbed is not None and all_perturbed is not False)
        if not self.state.sparse_now or encoder_hidden_states is not None or attention_mask is not None or perturbed:
            args = (attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
            if _takes_perturbation(type(self.original)):
                return self.original(*args, perturbation_mask=perturbation_mask, all_perturbed=all_perturbed)
            return self.original(*args)
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if query_rotary_emb is not None and attn.rope_type in ("interleaved", "split"):
            rope = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
            query = rope(query, query_rotary_emb)
            key = rope(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        grid = self.state.grid
        extra = query.shape[2] - (grid.num_tokens if grid is not None else 0)
        out = self.sparse(query, key, value, extra, "end").transpose(1, 2).to(query.dtype)  # [B, S, H, D]
        if gate_logits is not None:
            # The model's per-head output gate; 2 * sigmoid so zero-initialised logits give 1.
            out = out * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]


@functools.lru_cache(maxsize=None)
def _warn_dense(reason: str) -> None:
    log.warning("nabla_attn: LTX2VideoTransformer3DModel %s; such forwards run dense attention", reason)


def _read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid | None, int, float | None]:
    x = bound.arguments["hidden_states"]  # [B, N, C], already packed
    batch, step = x.shape[0], timestep_value(bound.arguments.get("timestep"))
    sizes = [bound.arguments.get(k) for k in ("num_frames", "height", "width")]
    if any(s is None for s in sizes):
        _warn_dense("was called without num_frames/height/width (video_coords alone give no grid)")
        return None, batch, step
    p, pt = model.config.patch_size, model.config.patch_size_t
    # ceil: the model's own coordinates are arange(0, size, patch)
    f, h, w = (-(-int(n) // d) for n, d in zip(sizes, (pt, p, p)))
    grid = VideoGrid(f, h, w)
    if x.shape[1] < grid.num_tokens:
        _warn_dense(f"got {x.shape[1]} tokens, fewer than its {f}x{h}x{w} grid (a subset of the video)")
        return None, batch, step
    return grid, batch, step


FAMILY = Family(
    name="ltx2",
    model_class=LTX2VideoTransformer3DModel,
    attention_layers=_layers,
    read_inputs=_read_inputs,
    processor_class=LTX2NablaProcessor,
    original_processor_names=("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor"),
)
