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


WAN_TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, out_channels=4, text_dim=16, freq_dim=32,
    ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
)  # fmt: skip


def _wan_inputs(batch: int, channels: int, frames: int, height: int, width: int) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, channels, frames, 2 * height, 2 * width),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16),
    }


def wan_vace(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    model = WanVACETransformer3DModel(**WAN_TINY, in_channels=4, vace_layers=[0, 1], vace_in_channels=6)
    inputs = _wan_inputs(batch, 4, frames, height, width)
    inputs["control_hidden_states"] = torch.randn(batch, 6, frames, 2 * height, 2 * width)
    return model.eval(), inputs


def wan_animate(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``frames`` counts the reference frame: pose latents and face video cover ``frames - 1``."""
    from diffusers import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    model = WanAnimateTransformer3DModel(
        **WAN_TINY, in_channels=12, latent_channels=4, image_dim=None, motion_encoder_size=16,
        motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=2,
    )  # fmt: skip
    inputs = _wan_inputs(batch, 12, frames, height, width)
    inputs["pose_hidden_states"] = torch.randn(batch, 4, frames - 1, 2 * height, 2 * width)
    inputs["face_pixel_values"] = torch.randn(batch, 3, 4 * (frames - 1) - 3, 16, 16)
    return model.eval(), inputs


def chronoedit(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import ChronoEditTransformer3DModel

    torch.manual_seed(seed)
    model = ChronoEditTransformer3DModel(**WAN_TINY, in_channels=4, rope_temporal_skip_len=2)
    return model.eval(), _wan_inputs(batch, 4, frames, height, width)


def skyreels_v2(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(**WAN_TINY, in_channels=4)
    return model.eval(), _wan_inputs(batch, 4, frames, height, width)


def hunyuan_video15(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Text = 12 Qwen + 3 ByT5 + 5 image tokens; T2V (zero image embeddings) marks the image tokens
    padding; with batch 2 the second sample's prompts are shorter too."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    mask, mask_2 = torch.ones(batch, TEXT, dtype=torch.long), torch.ones(batch, 3, dtype=torch.long)
    if batch > 1:
        mask[1, TEXT - 5 :] = 0
        mask_2[1, 2:] = 0
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, height, width),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, 3, 8),
        "encoder_attention_mask_2": mask_2,
        "image_embeds": torch.zeros(batch, 5, 8),
    }
    return model.eval(), inputs


def ltx2(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=12,
    )  # fmt: skip
    tokens, audio = frames * height * width, 10
    inputs = {
        "hidden_states": torch.randn(batch, tokens, 8),
        "audio_hidden_states": torch.randn(batch, audio, 4),
        "encoder_hidden_states": torch.randn(batch, 7, 12),
        "audio_encoder_hidden_states": torch.randn(batch, 7, 12),
        "timestep": torch.full((batch, tokens), 500.0),
        "audio_timestep": torch.full((batch,), 500.0),
        "encoder_attention_mask": torch.ones(batch, 7),
        "audio_encoder_attention_mask": torch.ones(batch, 7),
        "num_frames": frames, "height": height, "width": width, "audio_num_frames": audio,
    }  # fmt: skip
    return model.eval(), inputs


def consisid(batch: int = 1, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import ConsisIDTransformer3DModel

    torch.manual_seed(seed)
    model = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=2 * width, sample_height=2 * height, sample_frames=frames * 4 - 3,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    angles = torch.rand(frames * height * width, 8) * 6.28
    inputs = {
        "hidden_states": torch.randn(batch, frames, 4, 2 * height, 2 * width),
        "encoder_hidden_states": torch.randn(batch, TEXT, 8),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "image_rotary_emb": (angles.cos(), angles.sin()),
    }
    return model.eval(), inputs


K5_GRID = (2, 16, 24)  # fractal order needs whole 8x8 tiles: 2 frames of 2 x 3 tiles


def kandinsky5(batch: int = 1, frames: int = K5_GRID[0], height: int = K5_GRID[1], width: int = K5_GRID[2], seed: int = 0,
               fractal: bool = True, P: float = 0.6, window: tuple[int, int, int] = (1, 1, 2),
               visual_cond: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """A Kandinsky 5 NABLA checkpoint (``attention_P=P``, ``attention_w{T,H,W}=window``; the even width
    acts as 3) with ``sparse_params`` built as its pipeline builds them (``fractal=False``: none, so the
    model runs in natural order; ``visual_cond``: the I2V model, latents + image latents + mask).
    Its modulations are zero-initialised, which would make attention irrelevant: they are randomised."""
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

    torch.manual_seed(seed)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), attention_type="nabla",
        attention_P=P, attention_wT=window[0], attention_wH=window[1], attention_wW=window[2], attention_add_sta=True,
        attention_method="topcdf", visual_cond=visual_cond,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.3)
    sparse_params = None
    if fractal:
        sta = Kandinsky5T2VPipeline.fast_sta_nabla(frames, height // 8, width // 8, *window, device="cpu")
        sparse_params = {"sta_mask": sta[None, None], "to_fractal": True, "P": P, "visual_shape": (frames, height, width)}
    inputs = {
        "hidden_states": torch.randn(batch, frames, 2 * height, 2 * width, 9 if visual_cond else 4),
        "encoder_hidden_states": torch.randn(batch, 5, 16),
        "timestep": torch.full((batch,), 500.0),
        "pooled_projections": torch.randn(batch, 8),
        "visual_rope_pos": [torch.arange(frames), torch.arange(height), torch.arange(width)],
        "text_rope_pos": torch.arange(5),
        "sparse_params": sparse_params,
    }
    return model.eval(), inputs


def kandinsky6_sr(batch: int = 1, frames: int = K5_GRID[0], height: int = K5_GRID[1], width: int = K5_GRID[2],
                  seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    from diffusers import Kandinsky6SRTransformer3DModel

    torch.manual_seed(seed)
    model = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=32,
        num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_threshold=0.6, nabla_window=(1, 1, 3),
    )  # fmt: skip
    inputs = {"hidden_states": torch.randn(batch, frames, height, width, 9), "timestep": torch.full((batch,), 500.0)}
    return model.eval(), inputs


FACTORIES: dict[str, Callable[..., tuple[torch.nn.Module, dict[str, Any]]]] = {
    "wan": wan,
    "wan_vace": wan_vace,
    "wan_animate": wan_animate,
    "chronoedit": chronoedit,
    "skyreels_v2": skyreels_v2,
    "hunyuan_video": hunyuan_video,
    "hunyuan_video15": hunyuan_video15,
    "cogvideox": cogvideox,
    "consisid": consisid,
    "ltx_video": ltx_video,
    "ltx2": ltx2,
    "kandinsky5": kandinsky5,
    "kandinsky6_sr": kandinsky6_sr,
}


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The video output (Kandinsky 5 returns a bare tensor with ``return_dict=False``, LTX-2 video and audio)."""
    out = model(**inputs, return_dict=False)
    return out if isinstance(out, torch.Tensor) else out[0]
