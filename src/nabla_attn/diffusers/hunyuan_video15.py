"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): dual-stream blocks only; each
``transformer_blocks[i].attn`` is joint self-attention over the video tokens (RoPE) followed by the
text tokens (Qwen, ByT5 and image tokens, reordered per sample so that the valid ones come first).

Unlike HunyuanVideo 1.0 the model masks padded text as queries *and* keys, so a padded text row
attends to nothing and comes out 0. Text blocks stay dense, as queries and as keys. The text
refiner's self-attention (``context_embedder``) is text-only and untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15Transformer3DModel

from ._core import Family, NablaProcessorBase
from .hunyuan_video import prefix_masked_sparse, read_inputs


class HunyuanVideo15NablaProcessor(NablaProcessorBase):
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The model always passes the text mask; without one the original fails the same way it would.
        if not self.state.sparse_now or encoder_hidden_states is None or attention_mask is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        heads = attn.heads
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (heads, -1)))
        value = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        # [B, S, H, D] -> [B, H, S, D], video first, text after (the model's order)
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((query, eq), (key, ek), (value, ev)))
        text = encoder_hidden_states.shape[1]
        key_ok = F.pad(attention_mask.bool(), (q.shape[2] - attention_mask.shape[1], 0), value=True)
        out = prefix_masked_sparse(self, q, k, v, text, key_ok, pad_queries="zero")
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        out, encoder_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]


FAMILY = Family(
    name="hunyuan_video15",
    model_class=HunyuanVideo15Transformer3DModel,
    attention_layers=_layers,
    read_inputs=read_inputs,
    processor_class=HunyuanVideo15NablaProcessor,
    original_processor_names=("HunyuanVideo15AttnProcessor2_0",),
)
