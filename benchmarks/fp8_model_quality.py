"""The bundled video DiT sampled with ``precision="fp8"`` NABLA against the same NABLA in the input
dtype (issue 18's video check), on the CPU through Triton's interpreter.

No GPU time was left to run this on the H200, so it runs the same kernel arithmetic under the CPU
interpreter. The interpreter rounds to e4m3 exactly (the kernels' ``EXACT`` path) and accumulates
the e4m3 products in float32. Hopper's fp8 tensor cores accumulate with fewer bits, so the GPU's
error can be somewhat larger. The model runs in float16, because the interpreter has no bfloat16
dot. Settings: the demo's (bundled per-head calibration, ~30% kept, clip ``bikes``, seed 0, 12
steps, small size), original weights.

    PYTHONPATH=src python benchmarks/fp8_model_quality.py --out benchmarks/results/fp8_model_quality_cpu.json
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nabla_attn.demo.cli import BUNDLED_CALIBRATION, SIZES  # noqa: E402
from nabla_attn.demo.metrics import psnr, ssim  # noqa: E402
from nabla_attn.demo.model import CLASS_NAMES, assets_dir, load_bundled, sample  # noqa: E402
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla  # noqa: E402
from nabla_attn.kernels.interpreter import patch_scalars  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--clip", default="bikes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert patch_scalars(), "Triton's interpreter did not switch on"
    torch.set_num_threads(args.threads)
    model = load_bundled(dtype=torch.float16)
    model.set_attention(None)
    forward = model.forward  # the sampler's Euler updates run in float32; the network in float16
    model.forward = lambda x, t, labels: forward(x.half(), t, labels).float()  # type: ignore[method-assign]
    frames, height, width = SIZES["small"]
    noise = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([CLASS_NAMES.index(args.clip)])
    base = NablaConfig.from_calibration(assets_dir() / BUNDLED_CALIBRATION)
    videos: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    with torch.no_grad():
        for name, config in (("dense", None), ("nabla fp16", base), ("nabla fp8", NablaConfig(**{**base.__dict__, "precision": "fp8"}))):
            handle = apply_nabla(model.transformer, config) if config is not None else None
            t0 = time.perf_counter()
            try:
                videos[name] = sample(model, noise, labels, args.steps).float()
            finally:
                if handle is not None:
                    remove_nabla(handle)
            times[name] = time.perf_counter() - t0
            print(f"{name}: {times[name]:.0f} s", flush=True)
    res = {
        "psnr_fp8_vs_fp16_nabla_db": psnr(videos["nabla fp8"], videos["nabla fp16"]),
        "ssim_fp8_vs_fp16_nabla": ssim(videos["nabla fp8"][0].flatten(0, 1), videos["nabla fp16"][0].flatten(0, 1)),
        "psnr_fp16_nabla_vs_dense_db": psnr(videos["nabla fp16"], videos["dense"]),
        "psnr_fp8_nabla_vs_dense_db": psnr(videos["nabla fp8"], videos["dense"]),
        "settings": {"clip": args.clip, "steps": args.steps, "size": "small", "dtype": "float16",
                     "calibration": BUNDLED_CALIBRATION, "device": "cpu, Triton interpreter"},
        "times_s": times,
    }
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
