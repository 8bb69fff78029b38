"""Tiny randomly initialised diffusers video transformers (as diffusers' own tests build them) and
inputs whose latent grid is 3 x 10 x 18 tokens after patchify: 3 frames of 2 x 3 tiles, the last tile
column only 2 tokens wide and the last tile row 2 tokens high, so edge blocks hold padding."""

from __future__ import annotations

from typing import Any, Callable

import torch

FRAMES, HEIGHT, WIDTH = 3, 10, 18  # tokens after patchify
TEXT = 12


def wan(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, 2 * height, 2 * width),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16),
    }
    return model.eval(), inputs


def hunyuan_video(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )  # fmt: skip
    mask = torch.ones(batch, TEXT, dtype=torch.long)
    if batch > 1:
        mask[1, TEXT - 5 :] = 0  # a shorter second prompt: padded text tokens are masked keys
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, height, width),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 8),
        "guidance": torch.full((batch,), 3.5) * 1000,
    }
    return model.eval(), inputs


def cogvideox(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=2 * width, sample_height=2 * height, sample_frames=frames * 4 - 3,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    # CogVideoX 5B style: RoPE on the video tokens only (the pipeline computes the tables; any
    # cos/sin pair of shape [video tokens, head_dim] exercises the same path).
    angles = torch.rand(frames * height * width, 8) * 6.28
    inputs = {
        "hidden_states": torch.randn(batch, frames, 4, 2 * height, 2 * width),
        "encoder_hidden_states": torch.randn(batch, TEXT, 8),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "image_rotary_emb": (angles.cos(), angles.sin()),
    }
    return model.eval(), inputs


def ltx_video(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16,
    )  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(batch, frames * height * width, 4),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_attention_mask": torch.ones(batch, TEXT, dtype=torch.long),
        "num_frames": frames,
        "height": height,
        "width": width,
    }
    return model.eval(), inputs


FACTORIES: dict[str, Callable[..., tuple[torch.nn.Module, dict[str, Any]]]] = {
    "wan": wan,
    "hunyuan_video": hunyuan_video,
    "cogvideox": cogvideox,
    "ltx_video": ltx_video,
}


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]
