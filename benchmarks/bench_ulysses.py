"""Issue 6/7: a full Wan 14B transformer block at 720p, NABLA under Ulysses sequence parallelism.

One ``diffusers.WanTransformerBlock`` (dim 5120, 40 heads of 128, FFN 13824, random weights, bf16)
runs on 1, 2 (and 4) GPUs in one call. On W GPUs every rank holds 1/W of the sequence: all linears,
norms, the cross-attention and the FFN run on the local shard; self-attention goes through
``nabla_attn.distributed.ulysses_nabla_attention`` (two all-to-alls). Variants per world size:

* ``dense``: cuDNN SDPA (1 GPU), and dense Ulysses (the same all-to-alls around cuDNN SDPA).
* ``nabla`` (1 GPU): ``nabla_attention`` on the natural-order q, k, v (tiling, mask, kernel and
  untiling in one call, as a user meets it; its time is the phase ``attention``).
* ``nabla_plain`` / ``nabla_balanced`` (W > 1): contiguous head split vs kept-block balancing.

Random weights give near-uniform block maps, so every head would keep the same ~threshold share of
blocks and balancing would have nothing to do. To emulate a trained model's spread of per-head
densities, q of head h is multiplied by a fixed factor ``spread ** u_h`` (``u_h`` a seeded
permutation of evenly spaced values in [-1, 1]) in every variant; the threshold is then calibrated
once (on the 1-GPU run's q, k) so the mean kept density is ``--density``.

Timing: per iteration every rank waits on a barrier, then the block is timed with CUDA events; a
world's time is the slowest rank's, reported as the median over iterations. Phases inside the
attention (mask, all-to-all, attention) come from ``PhaseTimer`` CUDA events (means per rank).

    python benchmarks/bench_ulysses.py --gpus 1,2 --out results.json          # GPUs (NCCL)
    python benchmarks/bench_ulysses.py --device cpu --tiny --gpus 1,2          # CPU dry run (gloo)
    python benchmarks/bench_ulysses.py --smoke                                  # the same, reference backend
    python benchmarks/bench_ulysses.py --markdown results.json                  # table for the docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nabla_attn import TokenLayout, VideoGrid, nabla_attention, nabla_mask_tiled, select_backend, tile  # noqa: E402
from nabla_attn.distributed import (  # noqa: E402
    PhaseTimer,
    all_to_all_rows,
    balance_heads,
    contiguous_heads,
    rank_loads,
    ulysses_nabla_attention,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="comma-separated world sizes, e.g. 1,2,4 (processes = the largest)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="small block and grid (CPU dry run)")
    p.add_argument("--grid", default="21x40x80", help="latent token grid T x H x W (720p Wan: 21x40x80)")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=13824)
    p.add_argument("--text", type=int, default=512, help="cross-attention text tokens")
    p.add_argument("--density", type=float, default=0.10, help="target mean kept fraction of block pairs")
    p.add_argument("--spread", type=float, default=3.0, help="per-head q scale range (1 = no spread)")
    p.add_argument("--backend", default="flex", help="nabla_attention backend for the sparse attention")
    p.add_argument("--fallback-backend", default="", help="backend to switch to if --backend fails (e.g. triton)")
    p.add_argument("--query-block", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--variants", default="dense,nabla", help="dense and/or nabla")
    p.add_argument("--timeout", type=float, default=200.0, help="collective timeout, seconds")
    p.add_argument("--out", default=None, help="JSON results path (written after every variant)")
    p.add_argument("--smoke", action="store_true", help="CPU dry run: --device cpu --tiny --gpus 1,2, reference backend")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.tiny, args.gpus, args.backend, args.iters, args.warmup = "cpu", True, "1,2", "reference", 1, 1
    if args.tiny:
        args.grid, args.heads, args.head_dim, args.ffn, args.text = "2x16x24", 5, 32, 256, 16
    args.worlds = sorted({int(x) for x in args.gpus.split(",")})
    args.grid_t = VideoGrid(*(int(x) for x in args.grid.split("x")))
    return args


# ---------------------------------------------------------------------------------------------
# Self-attention processor for the block's attn1: projections, norms and RoPE as in Wan, then one of
# the attention variants. (Written for this benchmark; diffusers' own processor calls SDPA.)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs, ``x [B, S, H, D]``, ``cos/sin [1, S, 1, D]`` (float32)."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class Attn:
    def __init__(self, cfg: dict[str, Any], head_scale: torch.Tensor) -> None:
        self.cfg = cfg
        self.head_scale = head_scale  # [1, H, 1, 1]
        self.mode = "dense1"
        self.group: Any = None
        self.world = 1
        self.balance = True
        self.timer: PhaseTimer | None = None
        self.capture: dict[str, torch.Tensor] | None = None
        self.last_info: Any = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        q, k = rope(q, *rotary_emb), rope(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S_local, D]
        q = q * self.head_scale.to(q.dtype)
        if self.capture is not None:
            self.capture.update(q=q.detach(), k=k.detach())
        out = self.attend(q, k, v)
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cfg, timer, mode = self.cfg, self.timer, self.mode
        if mode == "dense1":
            if timer:
                timer.start("attention")
            out = sdpa(q, k, v)
        elif mode == "nabla1":
            if timer:
                timer.start("attention")
            out = nabla_attention(q, k, v, cfg["layout"].grid, cfg["threshold"], backend=cfg["backend"],
                                  query_block=cfg["query_block"])  # fmt: skip
        elif mode == "dense_ulysses":
            out = dense_ulysses(q, k, v, self.world, self.group, timer)
        elif mode == "nabla_ulysses":
            out, self.last_info = ulysses_nabla_attention(
                q, k, v, cfg["layout"].grid, cfg["threshold"], group=self.group, balance=self.balance,
                backend=cfg["backend"], query_block=cfg["query_block"], return_info=True, timer=timer,
            )  # fmt: skip
        else:
            raise ValueError(mode)
        if timer:
            timer.stop()
        return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def dense_ulysses(q, k, v, world: int, group, timer: PhaseTimer | None) -> torch.Tensor:
    """Plain Ulysses around cuDNN SDPA (equal sequence shards, contiguous heads)."""
    B, H, n, D = q.shape
    heads = [len(h) for h in contiguous_heads(H, world)]
    rank = dist.get_rank(group)
    hr = heads[rank]
    if timer:
        timer.start("all_to_all")
    x = torch.stack([q, k, v], dim=2).transpose(0, 1)  # [H, B, 3, n, D]
    (recv,) = all_to_all_rows([x], heads, [hr] * world, group)  # [world*hr, B, 3, n, D]
    recv = recv.view(world, hr, B, 3, n, D).permute(3, 2, 1, 0, 4, 5).reshape(3, B, hr, world * n, D)
    if timer:
        timer.start("attention")
    o = sdpa(recv[0], recv[1], recv[2])  # [B, hr, S, D]
    if timer:
        timer.start("all_to_all")
    o = o.view(B, hr, world, n, D).permute(2, 1, 0, 3, 4).reshape(world * hr, B, n, D)
    (back,) = all_to_all_rows([o], [hr] * world, heads, group)  # [H, B, n, D]
    return back.transpose(0, 1)


# ---------------------------------------------------------------------------------------------


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    dim = args.heads * args.head_dim
    torch.manual_seed(0)
    with torch.device(device):
        block = WanTransformerBlock(dim, args.ffn, args.heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    block = block.to(dtype).eval()
    for p in list(block.parameters()) + list(block.buffers()):
        dist.broadcast(p.data, src=0)  # identical random weights on every rank
    g = args.grid_t
    S = g.num_tokens
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(1, S, dim, device=device, dtype=dtype, generator=gen)
    text = torch.randn(1, args.text, dim, device=device, dtype=dtype, generator=gen)
    temb = torch.randn(1, 6, dim, device=device, dtype=dtype, generator=gen) * 0.5
    for t in (hidden, text, temb):
        dist.broadcast(t, src=0)
    rope_mod = WanRotaryPosEmbed(args.head_dim, (1, 2, 2), 1024).to(device)
    cos, sin = rope_mod(torch.empty(1, 1, g.frames, 2 * g.height, 2 * g.width, device=device))
    gen2 = torch.Generator().manual_seed(2)
    u = torch.linspace(-1.0, 1.0, args.heads)[torch.randperm(args.heads, generator=gen2)]
    head_scale = (args.spread ** u).view(1, args.heads, 1, 1).to(device)
    return block, hidden, text, temb, cos.float(), sin.float(), head_scale


def calibrate(q: torch.Tensor, k: torch.Tensor, lay: TokenLayout, density: float, query_block: int) -> tuple[float, list[float]]:
    """Threshold giving mean kept density ``density`` on these q, k (bisection; density rises with threshold)."""
    lo, hi = 1e-4, 1.0
    qt, kt = tile(q, lay), tile(k, lay)
    best = (1.0, [])
    for _ in range(14):
        mid = math.sqrt(lo * hi) if hi / lo > 4 else 0.5 * (lo + hi)
        m = nabla_mask_tiled(qt, kt, lay, mid, None, query_block=query_block)
        per_head = m.head_density()[0].tolist()
        d = sum(per_head) / len(per_head)
        best = (mid, per_head)
        if abs(d - density) < 0.003:
            break
        if d > density:
            hi = mid
        else:
            lo = mid
    return best


def warm_compile(args: argparse.Namespace, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, rank: int) -> bool:
    """Compile the sparse attention for the Ulysses head counts while rank 0 times the 1-GPU block.

    Compiled kernels are cached per process and, for inductor, on disk, so the later Ulysses runs
    skip most of the compile time. Any failure here is only reported: the real run will show it.
    """
    from nabla_attn import BlockSparseMask

    lay = cfg["layout"]
    try:
        for w in args.worlds:
            if w == 1 or rank >= w:
                continue
            h = len(contiguous_heads(args.heads, w)[rank])
            x = torch.randn(1, h, lay.tiled_len, args.head_dim, device=device, dtype=dtype)
            qb = cfg["query_block"]
            nq = -(-lay.num_blocks // (qb // 64))
            kept = torch.rand(1, h, nq, lay.num_blocks, device=device) < args.density
            nabla_attention(x, x, x, lay.grid, mask=BlockSparseMask(kept, lay, qb), backend=cfg["backend"],
                            token_order="tiled")  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except Exception:
        print(f"rank {rank}: warm-up compile failed:\n{traceback.format_exc()}", flush=True)
        return False


def run_variant(block, inputs, proc: Attn, group, world: int, args, device, keep: dict | None = None) -> dict[str, Any]:
    """Time the block; ``keep["out"]`` receives the last output (for the cross-world check)."""
    hidden, text, temb, cos, sin = inputs
    times: list[float] = []
    timer = PhaseTimer(device)
    for it in range(args.warmup + args.iters):
        proc.timer = timer if it >= args.warmup else None
        if world > 1:
            dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = block(hidden, text, temb, (cos, sin))
        if device.type == "cuda":
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if it >= args.warmup:
            times.append(ms)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
    phases = {k: v / args.iters for k, v in timer.totals().items()}
    slowest = [float(x) for x in t.tolist()]
    if keep is not None:
        keep["out"] = out
    return dict(block_ms=statistics.median(slowest), block_ms_iters=slowest, phases_ms_rank=phases)


def worker(rank: int, nprocs: int, args: argparse.Namespace, store: str) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=args.timeout))  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = dict(
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        cards=[torch.cuda.get_device_name(i) for i in range(nprocs)] if device.type == "cuda" else ["cpu"] * nprocs,
        torch=torch.__version__, grid=args.grid, heads=args.heads, head_dim=args.head_dim, ffn=args.ffn,
        text_tokens=args.text, backend=args.backend, query_block=args.query_block, spread=args.spread,
        target_density=args.density, iters=args.iters, runs={}, errors={},
    )  # fmt: skip
    groups = {w: (dist.new_group(list(range(w))) if w > 1 else None) for w in args.worlds}
    block, hidden, text, temb, cos, sin, head_scale = build(args, device, dtype)
    lay = TokenLayout(args.grid_t)
    cfg = dict(layout=lay, threshold=None, backend=args.backend, query_block=args.query_block)
    proc = Attn(cfg, head_scale)
    block.attn1.set_processor(proc)
    variants = args.variants.split(",")

    def save() -> None:
        if rank == 0 and args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    def record(name: str, fn) -> None:
        try:
            results["runs"][name] = fn()
            results["runs"][name]["backend"] = cfg["backend"] if "nabla" in name else "cudnn-sdpa"
            if name in results["errors"]:  # a retry (fallback backend) worked
                results.setdefault("recovered_errors", {})[name] = results["errors"].pop(name)
            if rank == 0:
                r = results["runs"][name]
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {r['block_ms']:.1f} ms/block  phases {r['phases_ms_rank']}", flush=True)
        except Exception:
            results["errors"][name] = traceback.format_exc()
            print(f"rank {rank} {name} FAILED:\n{results['errors'][name]}", flush=True)
        save()

    # ---- calibration on the 1-GPU q, k (rank 0), threshold broadcast to all -----------------------
    thr = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        proc.mode, proc.capture = "dense1", {}
        with torch.no_grad():
            block(hidden, text, temb, (cos, sin))
        q, k = proc.capture["q"], proc.capture["k"]
        proc.capture = None
        t_cal = time.perf_counter()
        threshold, per_head = calibrate(q, k, lay, args.density, args.query_block)
        ref_tables = nabla_mask_tiled(tile(q, lay), tile(k, lay), lay, threshold, None, query_block=args.query_block).kept
        results.update(threshold=threshold, head_density=per_head,
                       mean_density=sum(per_head) / len(per_head), calibration_s=time.perf_counter() - t_cal)  # fmt: skip
        thr[0] = threshold
        # How unequal the plain split is, from the single-process tables (kept block pairs per head).
        costs = [d for d in per_head]
        for w in args.worlds:
            if w > 1:
                plain = rank_loads(contiguous_heads(args.heads, w), costs)
                bal = rank_loads(balance_heads(costs, w), costs)
                mean = sum(costs) / w
                results.setdefault("imbalance", {})[str(w)] = dict(plain_max_over_mean=max(plain) / mean,
                                                                   balanced_max_over_mean=max(bal) / mean)  # fmt: skip
        del q, k
        print(f"threshold {threshold:.4f}: mean density {results['mean_density']:.4f}, per head "
              f"{min(per_head):.3f}..{max(per_head):.3f}, imbalance {results.get('imbalance')}", flush=True)  # fmt: skip
    dist.broadcast(thr, src=0)
    cfg["threshold"] = float(thr[0])
    # The single-process tables at that threshold, on every rank, to check the Ulysses tables against.
    qb = args.query_block
    ref_kept = torch.zeros(1, args.heads, -(-lay.num_blocks // (qb // 64)), lay.num_blocks, dtype=torch.uint8, device=device)
    if rank == 0:
        ref_kept.copy_(ref_tables)
        del ref_tables
    dist.broadcast(ref_kept, src=0)
    ref_kept = ref_kept.bool()

    # ---- 1 GPU (rank 0 alone; the other ranks warm their Ulysses compile meanwhile) -------------
    # A backend that fails here (compile error, unsupported shape) is swapped for --fallback-backend
    # on every rank before the multi-GPU runs: a rank failing inside a collective would hang the rest.
    backend_ok = 1
    keep_dense: dict[str, torch.Tensor] = {}
    keep_nabla: dict[str, torch.Tensor] = {}
    if 1 in args.worlds:
        if rank == 0:
            inputs = (hidden, text, temb, cos, sin)
            if "dense" in variants:
                proc.mode = "dense1"
                record("1gpu_dense", lambda: run_variant(block, inputs, proc, None, 1, args, device, keep_dense))
            if "nabla" in variants:
                proc.mode = "nabla1"
                record("1gpu_nabla", lambda: run_variant(block, inputs, proc, None, 1, args, device, keep_nabla))
                if "1gpu_nabla" in results["errors"] and args.fallback_backend:
                    backend_ok = 0
                    cfg["backend"] = args.fallback_backend
                    record("1gpu_nabla", lambda: run_variant(block, inputs, proc, None, 1, args, device, keep_nabla))
        elif "nabla" in variants and rank < max(args.worlds):
            backend_ok = int(warm_compile(args, cfg, device, dtype, rank))
        dist.barrier()
    flag = torch.tensor([backend_ok], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not int(flag[0]) and args.fallback_backend:
        cfg["backend"] = args.fallback_backend
        if rank == 0:
            print(f"backend {args.backend} failed; multi-GPU runs use {args.fallback_backend}", flush=True)
    results["backend_used_multi_gpu"] = cfg["backend"]
    # The 1-GPU block outputs on every rank, to compare each rank's shard of the multi-GPU output.
    refs: dict[str, torch.Tensor] = {}
    if 1 in args.worlds:
        for kind, keep in (("dense", keep_dense), ("nabla", keep_nabla)):
            have = torch.tensor([1 if "out" in keep else 0], device=device)
            dist.broadcast(have, src=0)
            if int(have[0]):
                ref = keep["out"] if rank == 0 else hidden.new_empty(hidden.shape)
                dist.broadcast(ref, src=0)
                refs[kind] = ref
        keep_dense.clear()
        keep_nabla.clear()

    # ---- W GPUs -----------------------------------------------------------------------------------
    for w in args.worlds:
        if w == 1:
            continue
        if rank < w:
            group = groups[w]
            S = args.grid_t.num_tokens
            sizes = [S // w + (1 if r < S % w else 0) for r in range(w)]
            o = sum(sizes[:rank])
            n = sizes[rank]
            inputs = (hidden[:, o : o + n], text, temb, cos[:, o : o + n], sin[:, o : o + n])
            proc.group, proc.world = group, w
            def rel_err(kind: str, keep: dict[str, torch.Tensor]) -> float | None:
                if kind not in refs or "out" not in keep:
                    return None
                ref = refs[kind][:, o : o + n].float()
                err = torch.stack([(keep["out"].float() - ref).norm() ** 2, ref.norm() ** 2])
                dist.all_reduce(err, group=group)
                return float((err[0] / err[1]).sqrt())

            if "dense" in variants and S % w == 0:
                proc.mode = "dense_ulysses"

                def go_dense() -> dict[str, Any]:
                    keep: dict[str, torch.Tensor] = {}
                    r = run_variant(block, inputs, proc, group, w, args, device, keep)
                    r["block_rel_err_vs_1gpu"] = rel_err("dense", keep)
                    return r

                record(f"{w}gpu_dense", go_dense)
            if "nabla" in variants:
                proc.mode = "nabla_ulysses"
                for bal in (False, True):
                    proc.balance = bal
                    name = f"{w}gpu_nabla_{'balanced' if bal else 'plain'}"

                    def go() -> dict[str, Any]:
                        keep: dict[str, torch.Tensor] = {}
                        r = run_variant(block, inputs, proc, group, w, args, device, keep)
                        r["block_rel_err_vs_1gpu"] = rel_err("nabla", keep)
                        info = proc.last_info
                        ref = ref_kept[:, info.local_heads]
                        diff = float((info.mask.kept != ref).float().mean())
                        per_rank = torch.zeros(w, dtype=torch.float64, device=device)
                        per_rank[rank] = float(info.mask.kept.sum())  # kept pairs of this rank's heads
                        dist.all_reduce(per_rank, group=group)
                        loads = [int(x) for x in per_rank.tolist()]
                        r.update(assignment=info.assignment, rank_kept_blocks=loads,
                                 busiest_over_mean=max(loads) * w / max(1, sum(loads)),
                                 mask_mismatch_vs_1gpu=diff)  # fmt: skip
                        return r

                    record(name, go)
        dist.barrier()

    # ---- gather per-rank phases on rank 0 and summarise -------------------------------------------
    probe = torch.empty(1, 1, 1, args.head_dim, device=device, dtype=dtype)
    chosen = select_backend(probe, cfg["backend"], False, args.query_block)
    pairs: list[Any] = [None] * nprocs
    dist.all_gather_object(pairs, (results["runs"], chosen))
    gathered = [p[0] for p in pairs]
    if rank == 0:
        results["backend_by_rank"] = [p[1] for p in pairs]
        for name, r in results["runs"].items():
            r["phases_ms_by_rank"] = [g.get(name, {}).get("phases_ms_rank") for g in gathered]
            ranks = [p for p in r["phases_ms_by_rank"] if p]
            att = max(p.get("attention", 0.0) + p.get("mask", 0.0) for p in ranks)
            a2a = max(p.get("all_to_all", 0.0) for p in ranks)
            r["attention_share"] = att / r["block_ms"]
            r["all_to_all_share"] = a2a / r["block_ms"]
        base = {k: results["runs"].get(f"1gpu_{k}", {}).get("block_ms") for k in ("dense", "nabla")}
        for name, r in results["runs"].items():
            kind = "dense" if "dense" in name else "nabla"
            if base[kind]:
                r["speedup_vs_1gpu_same_attention"] = base[kind] / r["block_ms"]
            if base["dense"]:
                r["speedup_vs_1gpu_dense"] = base["dense"] / r["block_ms"]
        save()
        print_table(results)
    dist.barrier()
    dist.destroy_process_group()


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['card']}  grid {results['grid']}  heads {results['heads']}  backend {results['backend']}  "
          f"threshold {results.get('threshold', float('nan')):.4f}  mean density {results.get('mean_density', float('nan')):.4f}")  # fmt: skip
    print(f"{'variant':<24}{'ms/block':>10}{'x 1GPU same':>13}{'x 1GPU dense':>14}{'attn share':>12}{'a2a share':>11}")
    for name, r in results["runs"].items():
        print(f"{name:<24}{r['block_ms']:>10.1f}{r.get('speedup_vs_1gpu_same_attention', float('nan')):>13.2f}"
              f"{r.get('speedup_vs_1gpu_dense', float('nan')):>14.2f}{r.get('attention_share', float('nan')):>12.2f}"
              f"{r.get('all_to_all_share', float('nan')):>11.2f}")  # fmt: skip
    for name, err in results["errors"].items():
        print(f"{name}: ERROR {err.strip().splitlines()[-1]}")


def markdown(results: dict[str, Any]) -> str:
    """A markdown table of one results JSON (for docs/benchmarks.md)."""
    lines = [
        f"Cards: {', '.join(results.get('cards', [results['card']]))}; torch {results['torch']}; grid {results['grid']}, "
        f"{results['heads']} heads x {results['head_dim']}, FFN {results['ffn']}, {results['text_tokens']} text tokens; "
        f"sparse backend {results.get('backend_used_multi_gpu', results['backend'])}, query_block {results['query_block']}; "
        f"threshold {results.get('threshold', float('nan')):.4f} -> mean kept density {results.get('mean_density', float('nan')):.3f} "
        f"(per head {min(results.get('head_density', [0])):.3f}-{max(results.get('head_density', [0])):.3f}, q scale spread {results['spread']}).",
        "",
        "| variant | ms / block | speedup vs 1 GPU (same attention) | vs 1 GPU dense cuDNN | attention share | all-to-all share | kept blocks per rank | rel. err vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        def f(key: str, fmt: str = "{:.2f}") -> str:
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        kept = r.get("rank_kept_blocks")
        lines.append(
            f"| {name} | {r['block_ms']:.1f} | {f('speedup_vs_1gpu_same_attention')} | {f('speedup_vs_1gpu_dense')} | "
            f"{f('attention_share')} | {f('all_to_all_share')} | {kept if kept else '-'} | {f('block_rel_err_vs_1gpu', '{:.1e}')} |"
        )
    for name, err in results.get("errors", {}).items():
        lines.append(f"\n{name} failed: `{err.strip().splitlines()[-1]}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    args = parse_args(argv)
    nprocs = max(args.worlds)
    if args.device == "cuda" and torch.cuda.device_count() < nprocs:
        raise SystemExit(f"--gpus {args.gpus} needs {nprocs} GPUs, this machine has {torch.cuda.device_count()}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NVLink multicast off (shared hosts)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(nprocs, args, os.path.join(tmp, "store")), nprocs=nprocs, join=True)


if __name__ == "__main__":
    main()
