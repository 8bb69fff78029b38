"""GPU benchmark (issue 4): one diffusers Wan 2.1 14B transformer block at 720p, dense vs NABLA.

A real ``WanTransformer3DModel`` with the 14B config (dim 5120, 40 heads of 128, FFN 13824, one
block, random weights, bf16 with Wan's fp32 norms/modulation), text context 512 tokens, latent grid
21 x 45 x 80 tokens (1280x720, 81 frames). NABLA goes in through ``apply_nabla`` exactly as users
call it (``backend="auto"``). Measured in one run, CUDA events, median of ``--reps``:

* attention alone on the block's own q, k, v: cuDNN SDPA, FlashAttention-2 SDPA, NABLA (whole op),
  and NABLA split into tiling (q, k, v in + out back), mask construction, and the kernel alone;
* the block, eager: dense cuDNN, dense FlashAttention-2, NABLA;
* the block under ``torch.compile``: dense cuDNN, NABLA (graph count checked across two
  different masks: no recompile);
* the per-block limit at the measured density ``d``: ``block / (block - attn + attn_cudnn * d)``,
  against cuDNN and FlashAttention-2 blocks, and the share of it NABLA reaches (target >= 95%).

Run from the repo root on a CUDA machine: ``PYTHONPATH=src python benchmarks/bench_wan_block.py
--out results.json``. ``--smoke`` runs a tiny configuration on CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nabla_attn import VideoGrid, select_backend, tile, untile
from nabla_attn.attention import make_layout, run_backend
from nabla_attn.bench import natural_input_mask_cost
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla
from nabla_attn.masks import nabla_mask_tiled

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def timed(fn: Callable[[], Any], reps: int, warmup: int, device: str) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def profile_kernels(fn: Callable[[], Any], top: int = 14) -> list[dict[str, Any]]:
    """GPU kernels of one call of ``fn`` by self device time (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        if us > 0:
            rows.append({"kernel": e.key[:90], "calls": e.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"kernel": "(all kernels)", "calls": sum(r["calls"] for r in rows), "ms": total}] + rows[:top]


def sdpa_ctx(kind: str, device: str):
    if device != "cuda":
        return sdpa_kernel(SDPBackend.MATH)
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kind])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=45)
    ap.add_argument("--width", type=int, default=80)
    ap.add_argument("--threshold", type=float, default=0.1, help="NABLA threshold (overridden by --target-density)")
    ap.add_argument("--target-density", type=float, default=0.1, help="pick the threshold giving this kept density (0: off)")
    ap.add_argument("--query-block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=200.0, help="start the compiled dense block before budget/2 s, the compiled NABLA block before budget s")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, to check the script")
    ap.add_argument("--profile", action="store_true", help="GPU kernels of one dense and one NABLA eager block")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    from nabla_attn.diffusers.wan import _rope_interleaved

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        heads, head_dim, ffn, text_len, text_dim = 2, 64, 256, 16, 32
        args.frames, args.height, args.width, args.reps = 3, 10, 18, 2
    else:
        heads, head_dim, ffn, text_len, text_dim = 40, 128, 13824, 512, 4096
    grid = VideoGrid(args.frames, args.height, args.width)
    S = grid.num_tokens
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": {"dim": heads * head_dim, "heads": heads, "head_dim": head_dim, "ffn": ffn, "text_tokens": text_len,
                   "grid": [grid.frames, grid.height, grid.width], "tokens": S, "threshold": args.threshold,
                   "query_block": args.query_block, "dtype": str(dtype)},
        "ms": {},
    }  # fmt: skip
    ms = result["ms"]

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    log(f"{result['device']} torch {torch.__version__}; grid {grid.frames}x{grid.height}x{grid.width} = {S} tokens")
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
            out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        )  # fmt: skip
    dim = heads * head_dim
    latents = torch.empty(1, 16, grid.frames, 2 * grid.height, 2 * grid.width, device=device)
    # RoPE tables as a bf16 pipeline loaded with from_pretrained has them (Wan keeps rope in fp32).
    rotary = tuple(t.float() for t in model.rope(latents))
    model = model.to(dtype)
    for name in WanTransformer3DModel._keep_in_fp32_modules:  # as from_pretrained keeps them
        for mod_name, mod in model.named_modules():
            if mod_name.split(".")[-1] == name:
                mod.float()
    # A middle block: with tiling="forward" it receives tiled hidden states, as blocks 1..38 do.
    model.requires_grad_(False).eval()
    block = model.blocks[1]
    block.scale_shift_table.data = block.scale_shift_table.data.float()
    hidden = torch.randn(1, S, dim, device=device, dtype=dtype)
    context = torch.randn(1, text_len, dim, device=device, dtype=dtype)
    temb = torch.randn(1, 6, dim, device=device, dtype=dtype) * 0.1

    def run_block() -> torch.Tensor:
        return block(hidden, context, temb, rotary)

    # The block's own q, k, v (projections, RMSNorm, RoPE), [B, H, S, D].
    with torch.no_grad():
        attn = block.attn1
        shift, scale_msa = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        norm_x = (block.norm1(hidden.float()) * (1 + scale_msa) + shift).to(dtype)  # as the block does
        q, k, v = _get_qkv_projections(attn, norm_x, None)
        q = _rope_interleaved(attn.norm_q(q).unflatten(2, (heads, -1)), *rotary).transpose(1, 2).contiguous()
        k = _rope_interleaved(attn.norm_k(k).unflatten(2, (heads, -1)), *rotary).transpose(1, 2).contiguous()
        v = v.unflatten(2, (heads, -1)).transpose(1, 2).contiguous()
    backend = select_backend(q, "auto")
    result["backend"] = backend
    nabla_backend = "auto"  # what apply_nabla gets; becomes "flex" if auto's choice fails here
    log(f"nabla backend='auto' resolved to {backend!r}")
    reps, warm = args.reps, 2
    sdpa = torch.nn.functional.scaled_dot_product_attention
    layout = make_layout(grid)

    with torch.no_grad():
        # ---- attention alone
        for kind in ("cudnn", "flash"):
            if device != "cuda" and kind == "flash":
                continue
            try:
                with sdpa_ctx(kind, device):
                    ms[f"attn_dense_{kind}"] = timed(lambda: sdpa(q, k, v), reps, warm, device)
                log(f"attention dense {kind}: {ms[f'attn_dense_{kind}']:.2f} ms")
            except RuntimeError as exc:
                log(f"attention dense {kind} failed: {exc}")
        qt, kt, vt = tile(q, layout), tile(k, layout), tile(v, layout)
        if args.target_density:
            # Random weights give no trained attention pattern; pick the threshold whose kept density
            # on this block's own q, k is closest to the target (bisection: density grows with it).
            lo, hi = 1e-3, 1.0
            for _ in range(12):
                mid = (lo + hi) / 2
                dens = nabla_mask_tiled(qt, kt, layout, mid, None, query_block=args.query_block).density
                lo, hi = (mid, hi) if dens < args.target_density else (lo, mid)
            args.threshold = round((lo + hi) / 2, 5)
            result["config"]["threshold"] = args.threshold
        mask = nabla_mask_tiled(qt, kt, layout, args.threshold, None, query_block=args.query_block)
        density = mask.density
        result["density"] = density
        log(f"NABLA mask at threshold {args.threshold}: kept density {density:.4f}")
        scale = 1.0 / math.sqrt(head_dim)
        t = time.time()
        try:
            run_backend(backend, qt, kt, vt, mask, scale)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - one GPU call: record the failure, go on with flex
            if backend == "flex":
                raise
            result["auto_backend_failed"] = f"{backend}: {type(exc).__name__}: {str(exc)[:300]}"
            log(f"backend {backend!r} failed ({result['auto_backend_failed']}); continuing with 'flex'")
            backend = result["backend"] = nabla_backend = "flex"
            t = time.time()
            run_backend(backend, qt, kt, vt, mask, scale)
            if device == "cuda":
                torch.cuda.synchronize()
        result["first_kernel_call_s"] = time.time() - t  # compile of the kernel included
        ms["nabla_kernel"] = timed(lambda: run_backend(backend, qt, kt, vt, mask, scale), reps, warm, device)
        ms["nabla_mask"] = timed(
            lambda: nabla_mask_tiled(qt, kt, layout, args.threshold, None, query_block=args.query_block), reps, warm, device
        )
        try:  # the kernel engineer's fused Triton mask builder, when present (info only)
            from nabla_attn.kernels.mask_build import build_nabla_mask_fast, fast_mask_available

            if fast_mask_available(qt):
                ms["nabla_mask_fused_triton"] = timed(
                    lambda: build_nabla_mask_fast(qt, kt, layout, args.threshold, None, query_block=args.query_block),
                    reps, warm, device,
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - optional component, report and go on
            log(f"fused mask builder not timed: {type(exc).__name__}: {exc}")
        ms["nabla_tile_qkv"] = timed(lambda: (tile(q, layout), tile(k, layout), tile(v, layout)), reps, warm, device)
        # What the op runs on natural-order inputs: tiling that also writes the block means, then
        # the mask from those means (no second read of q and k); the same measurement as nabla bench.
        nat = natural_input_mask_cost(qt, kt, layout, args.threshold, args.query_block)
        ms.update({f"nabla_{name}": t for name, t in nat.items()})
        out_t = run_backend(backend, qt, kt, vt, mask, scale)
        ms["nabla_untile_out"] = timed(lambda: untile(out_t, layout, like=v), reps, warm, device)
        from nabla_attn import nabla_attention

        ms["attn_nabla_op"] = timed(
            lambda: nabla_attention(q, k, v, grid, args.threshold, backend=nabla_backend, query_block=args.query_block),
            reps, warm, device,
        )  # fmt: skip
        log(
            f"NABLA op {ms['attn_nabla_op']:.2f} ms = kernel {ms['nabla_kernel']:.2f} + mask {ms['nabla_mask']:.2f}"
            f" + tile {ms['nabla_tile_qkv']:.2f} + untile {ms['nabla_untile_out']:.2f}; with the means from tiling,"
            f" the mask costs {ms.get('nabla_mask_cost_ms', float('nan')):.2f}"
        )
        save()

        # ---- the block, eager
        for kind in ("cudnn", "flash"):
            if device != "cuda" and kind == "flash":
                continue
            with sdpa_ctx(kind, device):
                ms[f"block_dense_{kind}"] = timed(run_block, reps, warm, device)
                if args.profile and device == "cuda" and kind == "cudnn":
                    result["profile_dense_cudnn"] = profile_kernels(run_block)
            log(f"block dense {kind}: {ms[f'block_dense_{kind}']:.2f} ms")
        with sdpa_ctx("cudnn", device):  # cross-attention stays dense: give it the best kernel too
            dense_out = run_block()
            cfg = NablaConfig(threshold=args.threshold, query_block=args.query_block, backend=nabla_backend, tiling="layer")
            handle = apply_nabla(model, cfg)
            handle.set_grid(grid)
            ms["block_nabla"] = timed(run_block, reps, warm, device)
            if args.profile and device == "cuda":
                result["profile_nabla"] = profile_kernels(run_block)
                for name in ("profile_dense_cudnn", "profile_nabla"):
                    print(f"\n{name}:\n" + "\n".join(f"  {r['ms']:9.2f} ms {r['calls']:4d}x {r['kernel']}" for r in result[name]))
            nabla_out = run_block()
            stats = handle.stats()
            result["block_density"] = stats.last.get("blocks.1.attn1")
            remove_nabla(handle)
            # Tiling once per forward: this block gets tiled hidden states and permutes only the
            # RoPE tables; its output stays tiled.
            handle = apply_nabla(model, NablaConfig(**{**cfg.__dict__, "tiling": "forward"}))
            handle.set_grid(grid)
            hidden_tiled = tile(hidden, layout)
            ms["block_nabla_forward_tiled"] = timed(lambda: block(hidden_tiled, context, temb, rotary), reps, warm, device)
            fwd_out = untile(block(hidden_tiled, context, temb, rotary), layout)
            result["forward_vs_layer_tiling_max_abs_diff"] = float((fwd_out.float() - nabla_out.float()).abs().max())
            del hidden_tiled, fwd_out
            remove_nabla(handle)
            # Exactness of the whole sparse path in bf16: threshold 1 keeps every block.
            handle = apply_nabla(model, NablaConfig(threshold=1.0, query_block=args.query_block, backend=nabla_backend, tiling="layer"))
            handle.set_grid(grid)
            full_out = run_block()
            remove_nabla(handle)
            again = run_block()
        result["threshold1_rel_diff_vs_dense"] = float((full_out.float() - dense_out.float()).norm() / dense_out.float().norm())
        log(f"threshold 1.0 block vs dense cuDNN block: relative difference {result['threshold1_rel_diff_vs_dense']:.2e}")
        # What tiling once per forward would cost: the same dense block over the padded tiled length
        # (every 8x8 tile slot filled to 64, padding rows zero, RoPE permuted the same way).
        hidden_t = tile(hidden, layout)
        rotary_t = tuple(tile(r.transpose(1, 2), layout).transpose(1, 2) for r in rotary)
        qp, kp, vp = (tile(x, layout) for x in (q, k, v))
        with sdpa_ctx("cudnn", device):
            ms["block_dense_cudnn_tiled_len"] = timed(lambda: block(hidden_t, context, temb, rotary_t), reps, warm, device)
            ms["attn_dense_cudnn_tiled_len"] = timed(lambda: sdpa(qp, kp, vp), reps, warm, device)
        del qp, kp, vp, hidden_t
        log(
            f"dense block at the tiled length {layout.tiled_len}: {ms['block_dense_cudnn_tiled_len']:.2f} ms; NABLA block with"
            f" forward-level tiling {ms['block_nabla_forward_tiled']:.2f} ms (vs per-layer {ms['block_nabla']:.2f} ms,"
            f" max abs diff {result['forward_vs_layer_tiling_max_abs_diff']:.2e})"
        )
        result["remove_bit_exact"] = bool(torch.equal(again, dense_out))
        result["block_rel_diff_vs_dense"] = float((nabla_out.float() - dense_out.float()).norm() / dense_out.float().norm())
        log(f"block NABLA eager: {ms['block_nabla']:.2f} ms (density {result['block_density']:.4f}); remove exact: {result['remove_bit_exact']}")
        save()

        # ---- the block under torch.compile
        if not args.no_compile and time.time() - T0 < args.budget_s * 0.5:
            from torch._dynamo.utils import counters

            compiled = torch.compile(block)
            with sdpa_ctx("cudnn", device):
                t = time.time()
                compiled(hidden, context, temb, rotary)
                result["compile_dense_s"] = time.time() - t
                ms["block_dense_cudnn_compiled"] = timed(lambda: compiled(hidden, context, temb, rotary), reps, warm, device)
                log(f"block dense cudnn compiled: {ms['block_dense_cudnn_compiled']:.2f} ms (compile {result['compile_dense_s']:.0f} s)")
                save()
                if time.time() - T0 < args.budget_s:
                    handle = apply_nabla(
                        model, NablaConfig(threshold=args.threshold, query_block=args.query_block, backend=nabla_backend, tiling="layer")
                    )
                    handle.set_grid(grid)
                    t = time.time()
                    compiled(hidden, context, temb, rotary)
                    result["compile_nabla_s"] = time.time() - t
                    graphs = counters["stats"]["unique_graphs"]
                    # a different input gives a different mask: must reuse the graphs
                    compiled(hidden * 0.5 + 0.1, context, temb, rotary)
                    result["recompiled_on_new_mask"] = counters["stats"]["unique_graphs"] != graphs
                    ms["block_nabla_compiled"] = timed(lambda: compiled(hidden, context, temb, rotary), reps, warm, device)
                    remove_nabla(handle)
                    log(
                        f"block NABLA compiled: {ms['block_nabla_compiled']:.2f} ms (compile {result['compile_nabla_s']:.0f} s,"
                        f" recompiled on a new mask: {result['recompiled_on_new_mask']})"
                    )
        save()

    # ---- limits and ratios
    d = result["block_density"] or density
    rows = []
    attn_c = ms.get("attn_dense_cudnn")
    for label, blk, blk_attn in (("cuDNN", "block_dense_cudnn", "attn_dense_cudnn"), ("FA2", "block_dense_flash", "attn_dense_flash")):
        if blk not in ms or blk_attn not in ms or attn_c is None:
            continue
        non_attn = ms["block_dense_cudnn"] - attn_c  # the block minus its (best) dense attention
        ideal = non_attn + attn_c * d
        limit = ms[blk] / ideal
        speed = ms[blk] / ms["block_nabla"]
        rows.append((f"eager vs {label}", ms[blk], ms["block_nabla"], speed, limit, speed / limit))
        result[f"eager_vs_{label}"] = {"speedup": speed, "limit": limit, "share_of_limit": speed / limit, "non_attention_ms": non_attn}
        if "block_nabla_forward_tiled" in ms:
            speed_f = ms[blk] / ms["block_nabla_forward_tiled"]
            rows.append((f"eager, forward-level tiling, vs {label}", ms[blk], ms["block_nabla_forward_tiled"], speed_f, limit, speed_f / limit))
    if "block_nabla_compiled" in ms and attn_c is not None:
        blk = ms["block_dense_cudnn_compiled"]
        non_attn = blk - attn_c
        limit = blk / (non_attn + attn_c * d)
        speed = blk / ms["block_nabla_compiled"]
        rows.append(("compiled vs cuDNN", blk, ms["block_nabla_compiled"], speed, limit, speed / limit))
        result["compiled_vs_cuDNN"] = {"speedup": speed, "limit": limit, "share_of_limit": speed / limit, "non_attention_ms": non_attn}
    pad = layout.tiled_len / S - 1
    result["per_forward_tiling_padding_fraction"] = pad
    if "block_dense_cudnn_tiled_len" in ms and attn_c is not None:
        # Tiling once per forward pushes the padding slots through every non-attention op.
        non_attn_tiled = ms["block_dense_cudnn_tiled_len"] - ms["attn_dense_cudnn_tiled_len"]
        result["per_forward_tiling_extra_non_attention_ms"] = non_attn_tiled - (ms["block_dense_cudnn"] - attn_c)
    save()

    print()
    print(f"device: {result['device']}, torch {torch.__version__}, backend {backend}, density {d:.4f}, grid {grid.frames}x{grid.height}x{grid.width}")
    print("| ms | " + " | ".join(f"{k}" for k in ms) + " |")
    print("| --- | " + " | ".join("---" for _ in ms) + " |")
    print("| median | " + " | ".join(f"{v:.2f}" for v in ms.values()) + " |")
    print()
    print("| comparison | dense block ms | NABLA block ms | speedup | limit at density | share of limit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.2f}x | {r[4]:.2f}x | {100 * r[5]:.1f}% |")
    outside = ms["attn_nabla_op"] - ms["nabla_kernel"]
    print(f"\nNABLA work outside the kernel per layer: {outside:.2f} ms (mask {ms['nabla_mask']:.2f}, tile {ms['nabla_tile_qkv']:.2f}, untile {ms['nabla_untile_out']:.2f};"
          f" with the means from tiling the mask costs {ms.get('nabla_mask_cost_ms', float('nan')):.2f}:"
          f" q, k tiling {ms.get('nabla_tile_qk_pooled_ms', float('nan')):.2f} instead of {ms.get('nabla_tile_qk_ms', float('nan')):.2f},"
          f" mask from the means {ms.get('nabla_mask_from_means_ms', float('nan')):.2f})")
    if "per_forward_tiling_extra_non_attention_ms" in result:
        print(
            f"tiling once per forward: {100 * pad:.1f}% padding tokens, {result['per_forward_tiling_extra_non_attention_ms']:.2f} ms"
            f" more non-attention work per block, against {ms['nabla_tile_qkv'] + ms['nabla_untile_out']:.2f} ms of per-layer tiling it saves"
        )


if __name__ == "__main__":
    sys.exit(main())
