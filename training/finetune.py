"""Fine-tune the bundled video DiT with sparse self-attention active (NABLA's recipe: the paper
fine-tunes with its mask on before it reports quality), under one mask policy.

    PYTHONPATH=src python training/finetune.py --mask nabla:0.5 --steps 200 --out runs/ft_nabla
    PYTHONPATH=src python training/finetune.py --mask calibrated:nabla_calibration.json --out runs/ft_cal

Mask policies (``--mask``): ``nabla:THR``, ``nabla+sta:THR:T,H,W``, ``sta:T,H,W``, ``random:P``,
``calibrated:FILE`` (per-layer thresholds and dense steps from ``nabla calibrate``), ``dense``.

Losses (``--loss``): ``distill`` (default) regresses the sparse student's velocity onto the frozen
dense model's on the same noisy input, which is what "keep the output close to dense" asks for;
``flow`` is the paper's recipe, rectified-flow loss on the clips (as training/train.py). Noisy
inputs are the clips at the sampler's own times (``--sampler-steps``, shift 2), sparse steps only:
times a calibration keeps dense need no adaptation. Writes ``<out>/tiny_wan_video.{safetensors,json}``
(float16, loadable with ``nabla demo --weights``) and ``<out>/finetune_log.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nabla_attn.demo.model import MaskPolicy, TinyVideoDiT, flow_timesteps, load_bundled  # noqa: E402
from nabla_attn.demo.policy_spec import parse_policy  # noqa: E402
from train import ClipData  # noqa: E402

SIZES = {"small": (5, 48, 72), "large": (9, 64, 96)}


def parse_mask(text: str, num_layers: int) -> tuple[MaskPolicy | None, int]:
    """``--mask`` as (policy, dense steps); None = dense attention."""
    try:
        return parse_policy(text, num_layers)
    except ValueError as exc:
        raise SystemExit(f"--mask: {exc}") from None


def crop_batch(data: ClipData, gen: torch.Generator, size: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    frames, height, width = SIZES[size]
    return data.batch(gen, frames, height, width, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data/clips.npz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default=None, help="weights to start from (default: the bundled model)")
    ap.add_argument("--teacher", default=None, help="dense teacher for --loss distill (default: the bundled model, "
                    "so a run continued with --init still distils from the original)")
    ap.add_argument("--mask", required=True, help="mask policy, see above")
    ap.add_argument("--loss", choices=("distill", "flow"), default="distill")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this wall time")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sampler-steps", type=int, default=12, help="the sampler whose times the inputs use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-batch", type=int, default=4,
                    help="a fixed batch (one per sampler time) whose loss is logged: the training loss is too noisy to read")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", choices=("auto", "nabla", "masked-sdpa"), default="auto",
                    help="attention kernel while training: nabla_attention, or SDPA with the table as a token mask "
                         "(same math; auto: masked-sdpa on CPU, where the reference backend's backward is slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    student = load_bundled(args.init, device=device)
    policy, dense_steps = parse_mask(args.mask, student.config.num_layers)
    impl = args.impl if args.impl != "auto" else ("masked-sdpa" if device.type == "cpu" else "nabla")
    if policy is not None:
        policy = dataclasses.replace(policy, attention=impl)
    teacher: TinyVideoDiT | None = None
    if args.loss == "distill":
        teacher = load_bundled(args.teacher, device=device).eval().requires_grad_(False)
        teacher.set_attention(None)
    student.set_attention(policy)
    student.train()
    # The times the sampler evaluates the network at, minus the steps the policy keeps dense.
    times = torch.tensor(flow_timesteps(args.sampler_steps)[dense_steps : args.sampler_steps])
    data = ClipData(args.data, device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    # Fixed validation inputs: clips at evenly spread sampler times, their targets computed once.
    vgen = torch.Generator().manual_seed(args.seed + 1000)
    vx0, vlabels = crop_batch(data, vgen, args.size, args.val_batch)
    vt = times[torch.linspace(0, len(times) - 1, args.val_batch).round().long()].to(device)
    vxt = (1 - vt.view(-1, 1, 1, 1, 1)) * vx0 + vt.view(-1, 1, 1, 1, 1) * torch.randn(vx0.shape, generator=vgen).to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        vtarget = teacher(vxt, vt, vlabels).float() if teacher is not None else None

    def val_loss() -> float:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = student(vxt, vt, vlabels).float()
        target = vtarget if vtarget is not None else torch.zeros_like(pred)
        return float(F.mse_loss(pred, target)) if vtarget is not None else float("nan")

    log: list[dict[str, float]] = [{"step": 0, "val_loss": val_loss()}] if teacher is not None else []
    if log:
        print(json.dumps(log[0]), flush=True)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step_times: list[float] = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t_start = time.time()
    window_loss, window_n = 0.0, 0
    print(f"fine-tune {args.mask} ({policy.label() if policy else 'dense'}, dense steps {dense_steps}), loss {args.loss}, "
          f"{args.size} batch {args.batch}, {args.steps} steps, lr {args.lr}, device {device}", flush=True)
    step = 0
    while step < args.steps:
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            print(f"stopping at step {step}: --minutes {args.minutes} reached")
            break
        t0 = time.time()
        x0, labels = crop_batch(data, gen, args.size, args.batch)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t = times[torch.randint(0, len(times), (args.batch,), generator=gen)].to(device)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        with torch.no_grad(), amp:
            target = teacher(xt, t, labels).float() if teacher is not None else eps - x0
        for g in opt.param_groups:  # linear warmup, then constant: short runs need no decay
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        with amp:
            pred = student(xt, t, labels)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        window_loss += float(loss.detach())
        window_n += 1
        step_times.append(time.time() - t0)
        if step % args.log_every == 0 or step == args.steps:
            rec = {"step": step, "loss": window_loss / window_n, "sec_per_step": sum(step_times[-window_n:]) / window_n,
                   "elapsed_s": time.time() - t_start}
            if teacher is not None:
                rec["val_loss"] = val_loss()
            log.append(rec)
            print(json.dumps(rec), flush=True)
            window_loss, window_n = 0.0, 0

    from safetensors.torch import save_file

    student.set_attention(None)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(out / "tiny_wan_video.safetensors"))
    finetuned: dict[str, Any] = {"mask": args.mask, "impl": impl, "policy": policy.label() if policy else "dense",
                                 "dense_steps": dense_steps, "loss": args.loss, "steps": step, "batch": args.batch,
                                 "size": args.size, "lr": args.lr, "sampler_steps": args.sampler_steps,
                                 "init": args.init or "bundled", "teacher": args.teacher or "bundled", "minutes": (time.time() - t_start) / 60}
    trained = dict(student.config.trained, finetuned=finetuned)
    (out / "tiny_wan_video.json").write_text(replace(student.config, trained=trained).to_json())
    steady = sorted(step_times[len(step_times) // 5 :] or step_times)
    summary = {**finetuned, "median_step_s": steady[len(steady) // 2] if steady else None, "log": log}
    (out / "finetune_log.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {step} steps, median step {summary['median_step_s']:.2f}s; wrote {out}/tiny_wan_video.safetensors")


if __name__ == "__main__":
    main()
