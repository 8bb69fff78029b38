"""The bundled video DiT sampled with ``precision="fp8"`` NABLA against the same NABLA in the input
dtype (issue 18's video check): on a GPU (``--cuda``: the model in bfloat16, the real e4m3 kernel),
or on the CPU through Triton's interpreter.

The interpreter rounds to e4m3 exactly (the kernels' ``EXACT`` path) and accumulates the e4m3
products in float32; Hopper's fp8 tensor cores accumulate with fewer bits. On the CPU the model
runs in float16, because the interpreter has no bfloat16 dot. Settings: the demo's (bundled
per-head calibration, ~30% kept, clip ``bikes``, seed 0, 12 steps, small size), original weights.

    PYTHONPATH=src python benchmarks/fp8_model_quality.py --cuda --out benchmarks/results/fp8_model_quality_h200.json
    PYTHONPATH=src python benchmarks/fp8_model_quality.py --steps 3 --out benchmarks/results/fp8_model_quality_cpu.json
"""

from __future__ import annotations

import os
import sys

CUDA = "--cuda" in sys.argv
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nabla_attn.demo.cli import BUNDLED_CALIBRATION, SIZES  # noqa: E402
from nabla_attn.demo.metrics import psnr, ssim  # noqa: E402
from nabla_attn.demo.model import CLASS_NAMES, assets_dir, load_bundled, sample  # noqa: E402
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla  # noqa: E402
from nabla_attn.kernels.interpreter import patch_scalars  # noqa: E402


def capture_layers(store: list[tuple[torch.Tensor, ...]]) -> Callable[[bool], None]:
    """Record every per-head NABLA call's tiled q, k, v and table while switched on (the bundled
    calibration gives per-head thresholds, so the layers run ``_perhead.head_attention``, which calls
    ``nabla_attention`` with ``mask=``). Returns the switch."""
    from nabla_attn.diffusers import _perhead

    on = [False]
    original = _perhead.nabla_attention

    def wrapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any) -> Any:
        if on[0]:
            store.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), kw["mask"]))
        return original(q, k, v, *a, **kw)

    _perhead.nabla_attention = wrapped  # type: ignore[assignment]

    def switch(value: bool) -> None:
        on[0] = value

    return switch


def layer_errors(captured: list[tuple[torch.Tensor, ...]]) -> list[dict[str, Any]]:
    """Per captured call, cosine similarity and max error against float64 of: NABLA in bf16 and in
    fp8 (against the masked float64 attention), and dense attention in bf16 and in fp8 (every block
    kept, through the same kernels; against dense float64), over the real tokens."""
    from nabla_attn import nabla_attention
    from nabla_attn.backends.reference import reference_attention
    from nabla_attn.masks import BlockSparseMask

    rows = []
    for q, k, v, mask in captured:
        lay, scale = mask.layout, q.shape[-1] ** -0.5
        full = BlockSparseMask(torch.ones_like(mask.kept), lay, mask.query_block)
        valid = lay.valid_tokens(q.device)
        row: dict[str, Any] = {"shape": list(q.shape), "density": float(mask.kept.float().mean())}
        for tag, m in (("nabla", mask), ("dense", full)):
            want = reference_attention(q.double(), k.double(), v.double(), m, scale)[..., valid, :]
            for prec in ("bf16", "fp8"):
                got = nabla_attention(q, k, v, lay.grid, None, None, lay.text_tokens, lay.text_position, mask=m,
                                      token_order="tiled", precision=prec)[..., valid, :].double()  # type: ignore[arg-type]
                row[f"{prec}_{tag}"] = {
                    "cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)),
                    "max_abs_err": float((got - want).abs().max())}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--clip", default="bikes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda", action="store_true", help="run on the GPU in bfloat16 (default: CPU interpreter)")
    args = ap.parse_args()
    dev, dtype = ("cuda", torch.bfloat16) if args.cuda else ("cpu", torch.float16)
    if not args.cuda:
        assert patch_scalars(), "Triton's interpreter did not switch on"
        torch.set_num_threads(args.threads)
    model = load_bundled(dtype=dtype).to(dev)
    model.set_attention(None)
    forward = model.forward  # the sampler's Euler updates run in float32; the network in `dtype`
    model.forward = lambda x, t, labels: forward(x.to(dtype), t, labels).float()  # type: ignore[method-assign]
    frames, height, width = SIZES["small"]
    noise = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(0)).to(dev)
    labels = torch.tensor([CLASS_NAMES.index(args.clip)], device=dev)
    base = NablaConfig.from_calibration(assets_dir() / BUNDLED_CALIBRATION)
    captured: list[tuple[torch.Tensor, ...]] = []
    capture = capture_layers(captured) if args.cuda else None
    videos: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    with torch.no_grad():
        for name, config in (("dense", None), ("nabla 16-bit", base),
                             ("nabla fp8", NablaConfig(**{**base.__dict__, "precision": "fp8"}))):
            handle = apply_nabla(model.transformer, config) if config is not None else None
            t0 = time.perf_counter()
            mid = args.steps // 2
            on_step = None
            if capture is not None and name == "nabla 16-bit":  # the layers' q, k, v, mask at one step
                on_step = lambda i, _x: capture(i == mid - 1)  # noqa: E731
            try:
                videos[name] = sample(model, noise, labels, args.steps, on_step=on_step).float()
            finally:
                if handle is not None:
                    remove_nabla(handle)
            times[name] = time.perf_counter() - t0
            print(f"{name}: {times[name]:.0f} s", flush=True)
    res = {
        "psnr_fp8_vs_16bit_nabla_db": psnr(videos["nabla fp8"], videos["nabla 16-bit"]),
        "ssim_fp8_vs_16bit_nabla": ssim(videos["nabla fp8"][0].flatten(0, 1), videos["nabla 16-bit"][0].flatten(0, 1)),
        "psnr_16bit_nabla_vs_dense_db": psnr(videos["nabla 16-bit"], videos["dense"]),
        "psnr_fp8_nabla_vs_dense_db": psnr(videos["nabla fp8"], videos["dense"]),
        "settings": {"clip": args.clip, "steps": args.steps, "size": "small", "dtype": str(dtype).split(".")[-1],
                     "calibration": BUNDLED_CALIBRATION,
                     "device": torch.cuda.get_device_name() if args.cuda else "cpu, Triton interpreter"},
        "times_s": times,
    }
    if captured:
        res["layers_at_step"] = mid
        res["layers"] = layer_errors(captured)
        worst = min(r["fp8_nabla"]["cosine"] for r in res["layers"])
        res["layers_min_cosine_fp8_nabla"] = worst
        print(f"{len(captured)} attention calls captured; min fp8 NABLA cosine vs float64: {worst:.6f}")
    print(json.dumps({k: v for k, v in res.items() if k != "layers"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
