"""Writing the demo's pictures: side-by-side videos (mp4 through PyAV, else an animated GIF through
Pillow) and block-mask plots (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] video, got shape {tuple(video.shape)}")
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def side_by_side(videos: Sequence[torch.Tensor], gap: int = 2, scale: int = 2) -> np.ndarray:
    """Concatenate ``[3, T, H, W]`` videos left to right with a white gap; upscale by ``scale`` (nearest)."""
    frames = [to_uint8_frames(v) for v in videos]
    T, H = frames[0].shape[:2]
    parts = []
    for i, f in enumerate(frames):
        if f.shape[:2] != (T, H):
            raise ValueError("side_by_side needs videos with equal frame count and height")
        if i:
            parts.append(np.full((T, H, gap, 3), 255, np.uint8))
        parts.append(f)
    out = np.concatenate(parts, axis=2)
    if scale > 1:
        out = out.repeat(scale, axis=1).repeat(scale, axis=2)
    return out


def write_video(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """Write ``[T, H, W, 3]`` uint8 frames. ``.mp4`` uses PyAV (H.264, falling back to MPEG-4 part 2);
    ``.gif`` uses Pillow. Returns the path written."""
    path = Path(path)
    if path.suffix == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        return path
    if path.suffix != ".mp4":
        raise ValueError(f"video path must end in .mp4 or .gif, got {path}")
    import av

    # Codecs need even sizes.
    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    last_error: Exception | None = None
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height = frames.shape[2], frames.shape[1]
                stream.pix_fmt = "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "12"}
                for f in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return path
        except Exception as exc:  # codec missing from this FFmpeg build: try the next one
            last_error = exc
    raise RuntimeError(f"could not encode {path} with PyAV (last error: {last_error})")


def plot_masks(masks: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """One panel per entry: a bool block table ``[Qb, Kb]`` (black = computed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(masks)
    cols = 3 if n % 3 == 0 and n % 4 else min(4, n)  # full rows: 6 panels as 2 x 3, not 4 + 2
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, kept) in zip(axes.flat, masks.items()):
        k = kept.float().cpu().numpy()
        ax.imshow(1.0 - k, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nkept {k.mean():.0%}", fontsize=9)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
