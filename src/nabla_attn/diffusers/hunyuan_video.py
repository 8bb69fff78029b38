"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): every block's ``attn`` is joint self-attention
over video tokens followed by text tokens (dual-stream blocks project text separately, single-stream
blocks concatenate it); RoPE covers the video tokens only. Padded prompt tokens are masked as keys."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformer3DModel

from ..grid import VideoGrid
from ._core import Family, NablaProcessorBase, timestep_value

log = logging.getLogger("nabla_attn.diffusers")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _qkv(x: torch.Tensor, heads: int, to_q: Any, to_k: Any, to_v: Any, norm_q: Any, norm_k: Any) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, H, S, D]`` of one stream (video or text) with its projections and optional norms."""
    q, k, v = _heads(to_q(x), heads), _heads(to_k(x), heads), _heads(to_v(x), heads)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class HunyuanVideoNablaProcessor(NablaProcessorBase):
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.state.sparse_now or (attention_mask is not None and attention_mask.dtype != torch.bool):
            # The model builds a bool key mask; an additive float mask is outside what we can express.
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream and text:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = _qkv(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:
            n_video = query.shape[2] - (text if single_stream else 0)
            query = torch.cat([apply_rotary_emb(query[:, :, :n_video], image_rotary_emb), query[:, :, n_video:]], dim=2)
            key = torch.cat([apply_rotary_emb(key[:, :, :n_video], image_rotary_emb), key[:, :, n_video:]], dim=2)
        if not single_stream and text:
            eq, ek, ev = _qkv(encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                              attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        out = self._masked(query, key, value, text, attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        out, encoder_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out

    def _masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, mask: torch.Tensor | None) -> torch.Tensor:
        """NABLA with HunyuanVideo's key mask: each prompt's padding tokens (at the end) are not keys."""
        if mask is None:
            return self.sparse(q, k, v, text, "end")
        key_ok = mask.reshape(mask.shape[0], -1).expand(q.shape[0], q.shape[2])
        return prefix_masked_sparse(self, q, k, v, text, key_ok, pad_queries="dense")


# Reads the prompt lengths on the host: kept out of torch.compile graphs (a value in the graph would be
# guarded on, recompiling per prompt length). Hence one graph break per HunyuanVideo (1.0, 1.5) layer.
@torch._dynamo.disable
def prefix_masked_sparse(
    proc: NablaProcessorBase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, key_ok: torch.Tensor,
    pad_queries: Literal["dense", "zero"],
) -> torch.Tensor:  # fmt: skip
    """NABLA on ``[B, H, N, D]`` video-then-text tokens where ``key_ok [B, N]`` marks each batch entry's
    valid tokens, a prefix (the prompt's padding at the end). Each entry runs NABLA over its own valid
    tokens. Padded query rows: ``"dense"`` attends over the valid keys (HunyuanVideo's key-only mask),
    ``"zero"`` gives 0 (HunyuanVideo 1.5 masks them as queries too; SDPA returns 0 for such rows)."""
    B, _, N, _ = q.shape
    lengths = key_ok.sum(-1).tolist()
    if all(n == N for n in lengths):
        return proc.sparse(q, k, v, text, "end")
    prefix = torch.arange(N, device=key_ok.device)[None] < torch.tensor(lengths, device=key_ok.device)[:, None]
    if not torch.equal(prefix, key_ok.bool()):
        raise ValueError(f"{proc.name}: attention mask is not a prefix mask (padding must follow the prompt tokens)")
    outs = []
    for b, n in enumerate(lengths):
        n_text = text - (N - n)
        if n_text < 0:
            raise ValueError(f"{proc.name}: attention mask hides video tokens: {n} valid of {N} with {text} text tokens")
        o = proc.sparse(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], n_text, "end", record=False)
        if n < N:
            if pad_queries == "dense":
                # Padding queries never reach a valid token (they are masked as keys everywhere), but
                # compute them as the model does so encoder states stay identical at threshold 1.
                rest = F.scaled_dot_product_attention(q[b : b + 1, :, n:], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
            else:
                rest = v.new_zeros(1, v.shape[1], N - n, v.shape[3])
            o = torch.cat([o, rest], dim=2)
        outs.append(o)
    if proc.pending and proc.state.stats is not None:  # one record per forward: the batch's mean density
        proc.state.record(proc.index, torch.stack(proc.pending).mean())
    proc.pending.clear()
    return torch.cat(outs, dim=0)


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    dual = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]
    single = [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)]
    return dual + single


def read_inputs(model: torch.nn.Module, bound: inspect.BoundArguments) -> tuple[VideoGrid, int, float | None]:
    """Grid, batch and timestep of a model taking ``[B, C, F, H, W]`` latents with ``patch_size`` and
    ``patch_size_t`` in its config (HunyuanVideo 1.0 and 1.5)."""
    x = bound.arguments["hidden_states"]  # [B, C, F, H, W]
    if x.dim() != 5:
        raise ValueError(f"{type(model).__name__}: expected 5-D latents [B, C, F, H, W], got {tuple(x.shape)}")
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = VideoGrid(x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p)
    return grid, x.shape[0], timestep_value(bound.arguments.get("timestep"))


FAMILY = Family(
    name="hunyuan_video",
    model_class=HunyuanVideoTransformer3DModel,
    attention_layers=_layers,
    read_inputs=read_inputs,
    processor_class=HunyuanVideoNablaProcessor,
    original_processor_names=("HunyuanVideoAttnProcessor2_0",),
)
