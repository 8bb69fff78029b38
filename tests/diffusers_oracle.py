"""An oracle for apply_nabla that shares nothing with it but ``nabla_attention``: the *unpatched*
model, whose video self-attention is replaced at diffusers' own dispatch point (the
``dispatch_attention_fn`` name the family's transformer module calls, or ``F`` in
``attention_processor`` for CogVideoX, whose processor calls SDPA directly) by ``nabla_attention`` on
the grid, text count and text position that :func:`expected_layout` derives from the inputs' shapes
and the model config. Every other attention call (cross-attention, text-only, audio) passes through.

A wrong grid, text position or token order in a family module makes the model's output differ
from this oracle below threshold 1, where threshold 1 (keep everything) could not tell.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from nabla_attn import VideoGrid, nabla_attention

_T = "diffusers.models.transformers."
# Where each family's self-attention reaches attention, and in which layout ("bshd": dispatch_attention_fn).
SITES: dict[str, tuple[str, str]] = {
    "wan": (_T + "transformer_wan", "bshd"),
    "wan_vace": (_T + "transformer_wan", "bshd"),  # VACE imports Wan's processor
    "wan_animate": (_T + "transformer_wan_animate", "bshd"),
    "chronoedit": (_T + "transformer_chronoedit", "bshd"),
    "skyreels_v2": (_T + "transformer_skyreels_v2", "bshd"),
    "hunyuan_video": (_T + "transformer_hunyuan_video", "bshd"),
    "hunyuan_video15": (_T + "transformer_hunyuan_video15", "bshd"),
    "cogvideox": ("diffusers.models.attention_processor", "bhsd"),
    "consisid": ("diffusers.models.attention_processor", "bhsd"),
    "ltx_video": (_T + "transformer_ltx", "bshd"),
    "ltx2": (_T + "transformer_ltx2", "bshd"),
    "kandinsky5": (_T + "transformer_kandinsky", "bshd"),
    "kandinsky6_sr": (_T + "transformer_kandinsky6_sr", "bshd"),
}


@dataclass(frozen=True)
class Layout:
    """What the model defines for its video self-attention: the grid, text (or other fully attended)
    tokens and where they sit, the token order, and per batch entry how many leading tokens are valid
    (None: all) with what padded query rows get ("dense" over valid keys, or "zero")."""

    grid: VideoGrid
    text: int = 0
    position: str = "end"
    order: str = "natural"
    valid: tuple[int, ...] | None = None
    pad_rows: str = "dense"

    @property
    def seq(self) -> int:
        return self.grid.num_tokens + self.text


def expected_layout(family: str, model: torch.nn.Module, inputs: dict[str, Any]) -> Layout:
    """The layout, from the inputs' shapes and the model's config only."""
    x, c = inputs["hidden_states"], model.config
    if family in ("wan", "wan_vace", "wan_animate", "chronoedit", "skyreels_v2"):
        pt, ph, pw = c.patch_size
        return Layout(VideoGrid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw))
    if family == "hunyuan_video":
        grid = VideoGrid(x.shape[2] // c.patch_size_t, x.shape[3] // c.patch_size, x.shape[4] // c.patch_size)
        text = inputs["encoder_hidden_states"].shape[1]
        valid = tuple(grid.num_tokens + int(m.sum()) for m in inputs["encoder_attention_mask"])
        return Layout(grid, text, "end", valid=valid, pad_rows="dense")
    if family == "hunyuan_video15":
        grid = VideoGrid(x.shape[2] // c.patch_size_t, x.shape[3] // c.patch_size, x.shape[4] // c.patch_size)
        image = inputs["image_embeds"]
        text = inputs["encoder_hidden_states"].shape[1] + inputs["encoder_hidden_states_2"].shape[1] + image.shape[1]
        image_valid = 0 if bool((image == 0).all()) else image.shape[1]  # all-zero image embeddings: T2V, all padding
        masks = zip(inputs["encoder_attention_mask"], inputs["encoder_attention_mask_2"])
        valid = tuple(grid.num_tokens + int(m.sum()) + int(m2.sum()) + image_valid for m, m2 in masks)
        return Layout(grid, text, "end", valid=valid, pad_rows="zero")
    if family in ("cogvideox", "consisid"):
        pt = getattr(c, "patch_size_t", None)
        frames = x.shape[1] if pt is None else -(-x.shape[1] // pt)
        grid = VideoGrid(frames, x.shape[3] // c.patch_size, x.shape[4] // c.patch_size)
        return Layout(grid, inputs["encoder_hidden_states"].shape[1], "start")
    if family == "ltx_video":
        return Layout(VideoGrid(inputs["num_frames"] // c.patch_size_t, inputs["height"] // c.patch_size,
                                inputs["width"] // c.patch_size))  # fmt: skip
    if family == "ltx2":
        grid = VideoGrid(-(-inputs["num_frames"] // c.patch_size_t), -(-inputs["height"] // c.patch_size),
                         -(-inputs["width"] // c.patch_size))  # fmt: skip
        return Layout(grid, x.shape[1] - grid.num_tokens, "end")  # appended keyframe tokens: fully attended
    if family in ("kandinsky5", "kandinsky6_sr"):
        pt, ph, pw = c.patch_size
        grid = VideoGrid(x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)
        sparse_params = inputs.get("sparse_params")
        fractal = family == "kandinsky6_sr" or bool(sparse_params and sparse_params.get("to_fractal"))
        return Layout(grid, order="tiled" if fractal else "natural")
    raise KeyError(family)


def _nabla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, threshold: float, sta: Any) -> torch.Tensor:
    """``[B, H, S, D]`` video self-attention as the layout says, per batch entry where prompts differ."""
    if lay.valid is None or all(n == lay.seq for n in lay.valid):
        return nabla_attention(q, k, v, lay.grid, threshold, sta, lay.text, lay.position, token_order=lay.order,
                               backend="reference")  # fmt: skip
    outs = []
    for b, n in enumerate(lay.valid):
        qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        o = nabla_attention(qb[:, :, :n], kb, vb, lay.grid, threshold, sta, n - lay.grid.num_tokens, lay.position,
                            backend="reference")  # fmt: skip
        pad = F.scaled_dot_product_attention(qb[:, :, n:], kb, vb) if lay.pad_rows == "dense" else vb.new_zeros(
            1, v.shape[1], lay.seq - n, v.shape[3])
        outs.append(torch.cat([o, pad], dim=2))
    return torch.cat(outs)


@contextlib.contextmanager
def oracle(family: str, lay: Layout, threshold: float, sta_window: Any = None) -> Iterator[list[int]]:
    """Patch the family's dispatch point; yields a list that counts the replaced calls."""
    module_name, kind = SITES[family]
    module = importlib.import_module(module_name)
    calls: list[int] = []

    def video_self(q_len: int, k_len: int) -> bool:
        return q_len == k_len == lay.seq

    if kind == "bhsd":  # CogVideoX: F.scaled_dot_product_attention inside attention_processor
        sdpa = F.scaled_dot_product_attention

        def patched_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not video_self(q.shape[2], k.shape[2]) or kwargs.get("attn_mask") is not None:
                return sdpa(q, k, v, *args, **kwargs)
            calls.append(q.shape[2])
            return _nabla(q, k, v, lay, threshold, sta_window)

        proxy = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
        proxy.scaled_dot_product_attention = patched_sdpa
        patch: tuple[Any, str, Any] = (module, "F", proxy)
    else:
        dispatch: Callable[..., torch.Tensor] = module.dispatch_attention_fn

        def patched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not video_self(q.shape[1], k.shape[1]):
                return dispatch(q, k, v, *args, **kwargs)
            calls.append(q.shape[1])
            out = _nabla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lay, threshold, sta_window)
            return out.transpose(1, 2)

        patch = (module, "dispatch_attention_fn", patched)
    saved = getattr(patch[0], patch[1])
    setattr(*patch)
    try:
        yield calls
    finally:
        setattr(patch[0], patch[1], saved)
