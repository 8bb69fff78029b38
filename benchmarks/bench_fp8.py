"""FP8 forward (``precision="fp8"``, issue 18): accuracy and speed against the bf16 NABLA kernel and cuDNN.

One process, one card. Shape: Wan 14B 720p (B 1, H 40, grid 21x40x80 = 67,200 tokens, D 128,
bf16), structured q, k (``harness.structured_qkv``: random Fourier features of token positions plus
noise, so the block maps are local like a trained DiT's), a NABLA mask at ~10 % kept blocks
(threshold by bisection), for ``query_block`` 64 and 128.

(a) Accuracy, on sampled query rows of a few heads against float64 on the same masked problem
(``harness.masked_errors``; PyTorch's own bf16 SDPA on the same rows is the yardstick): max abs
error, relative error, cosine similarity, and the fp8 error as a multiple of the bf16 NABLA
kernel's error on the same rows.

(b) Speed, CUDA events, median of ``--reps`` calls after 2 warm-up calls:
- ``cudnn``: dense SDPA (cuDNN), bf16, natural order;
- ``op_bf16`` / ``op_fp8``: ``nabla_attention(q, k, v, grid, threshold, query_block=..., precision=...)``
  on natural-order input, everything (tiling, mask, quantisation, kernel, untiling) inside the call;
- kernel-only on pre-tiled input with the mask and kv lists prebuilt: ``bf16`` (the backend's
  default kernel: Gluon on Hopper for 128-row tables), ``bf16_triton`` (the Triton kernel), and the
  fp8 variants, each as ``+quant`` (pre-pass included) and ``kernel`` (on pre-quantised operands),
  plus the pre-pass alone. ``int8_qk*``: the experimental int8 Q.K^T (SageAttention's choice), to
  compare accuracy and speed with e4m3 on the same run.

Every variant is wrapped: a failure is recorded and printed, and the others still run (a CUDA fault
that poisons the context makes the rest fail too; the JSON is rewritten after every step so what ran
is kept). The table is printed last.

    PYTHONPATH=src python3 benchmarks/bench_fp8.py --out fp8_h200.json
    PYTHONPATH=src python3 benchmarks/bench_fp8.py --smoke          # CPU, Triton interpreter, toy size
"""

from __future__ import annotations

import cpu_smoke  # first: a smoke run switches Triton's interpreter on before anything loads Triton

SMOKE = cpu_smoke.setup()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

import harness as H  # noqa: E402
from nabla_attn import TokenLayout, VideoGrid, backends, nabla_attention, tile, untile  # noqa: E402
from nabla_attn.backends.triton import KernelConfig, attention_fp8  # noqa: E402
from nabla_attn.kernels.attention_fp8 import forward_quantized, quantize  # noqa: E402

# kernel variants: name -> (P.V in e4m3, Q.K^T in int8 instead of e4m3, TMA loads, warps for 128-row
# tiles, stages). "fp8_qk" is what precision="fp8" runs; the int8 ones are SageAttention's choice.
FP8_VARIANTS: dict[str, tuple[bool, bool, bool, int, int]] = {
    "fp8_qk": (False, False, True, 4, 2),
    "fp8_qk_pv": (True, False, True, 4, 2),
    "fp8_qk_no_tma": (False, False, False, 4, 2),
    "fp8_qk_pv_no_tma": (True, False, False, 4, 2),
    "fp8_qk_pv_w8s3": (True, False, True, 8, 3),
    "int8_qk": (False, True, True, 4, 2),
    "int8_qk_pv": (True, True, True, 4, 2),
}
QUANT = {(False, False): "fp8_qk", (True, False): "fp8_qk_pv", (False, True): "int8_qk", (True, True): "int8_qk_pv"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="fp8_bench.json", help="JSON results (rewritten after every step)")
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU under Triton's interpreter")
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--reps", type=int, default=12, help="timed calls per measurement (median)")
    p.add_argument("--check-heads", type=int, default=4, help="heads in the accuracy check")
    p.add_argument("--check-rows", type=int, default=2048, help="sampled query rows per head")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip remaining timings past this")
    return p.parse_args()


class Run:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.res: dict[str, Any] = {"env": H.environment(device), "args": vars(args), "rows": [], "failures": []}

    def save(self) -> None:
        with open(self.args.out, "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    def attempt(self, label: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report, continue with the other variants
            msg = f"{label}: {type(exc).__name__}: {str(exc)[:400]}"
            print("FAILED", msg, flush=True)
            traceback.print_exc(limit=3)
            self.res["failures"].append(msg)
            return None
        finally:
            self.save()

    def time(self, label: str, fn: Callable[[], Any]) -> float | None:
        if time.perf_counter() - self.t0 > self.args.budget_s:
            self.res["failures"].append(f"{label}: skipped (past --budget-s)")
            return None
        reps, warm = (self.args.reps, 2) if torch.cuda.is_available() else (1, 0)
        ms = self.attempt(label, lambda: H.time_fixed(fn, reps, warm))
        if ms is not None:
            print(f"  {label}: {ms:.3f} ms", flush=True)
        return ms


def cosines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, outs: dict[str, torch.Tensor],
            scale: float, heads: int, rows: int) -> dict[str, float]:
    """Cosine similarity to float64 of natural-order outputs on the rows ``harness.masked_errors`` samples."""
    layout = mask.layout
    blk = H.natural_blocks(layout, q.device)
    gen = torch.Generator().manual_seed(1)  # the rows harness.masked_errors picks
    pick_all = torch.randperm(layout.seq_len, generator=gen)[:rows].sort().values.to(q.device)
    group = mask.query_block // 64
    dots: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n in outs}
    for h in range(min(heads, q.shape[1])):
        kept = mask.kept[0, 0 if mask.kept.shape[1] == 1 else h]
        allowed = kept[blk[pick_all] // group][:, blk]
        has = allowed.any(1)
        pick, allowed = pick_all[has], allowed[has]
        s = (q[0, h, pick].double() @ k[0, h].double().T * scale).masked_fill(~allowed, float("-inf"))
        ref = torch.softmax(s, -1) @ v[0, h].double()
        for n, o in outs.items():
            x = o[0, h, pick].double()
            d = dots[n]
            d[0] += float((x * ref).sum())
            d[1] += float((x * x).sum())
            d[2] += float((ref * ref).sum())
        del s, ref
    return {n: d[0] / math.sqrt(max(d[1] * d[2], 1e-300)) for n, d in dots.items()}


def main() -> int:
    args = parse_args()
    cuda = torch.cuda.is_available() and not SMOKE
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not SMOKE:
        print("no CUDA device: run with --smoke on the CPU")
        return 2
    if cuda:
        (frames, height, width), text, heads = H.SHAPES["wan14b_720p"]
        D, dtype = 128, torch.bfloat16
    else:
        (frames, height, width), text, heads = H.SHAPES["smoke"]
        # The interpreter has no bfloat16 dot: float16 (same code paths, same kernel specialisation rules).
        D, dtype = 32, torch.float16
    run = Run(args, device)
    layout = TokenLayout(VideoGrid(frames, height, width), text)
    grid = layout.grid
    run.res["shape"] = {"grid": [frames, height, width], "text_tokens": text, "heads": heads, "head_dim": D,
                        "seq_len": layout.seq_len, "dtype": str(dtype)}
    if cuda:
        cap = torch.cuda.get_device_capability(device)
        run.res["env"]["capability"] = list(cap)
        print(f"{run.res['env']['card']} sm_{cap[0]}{cap[1]}, torch {torch.__version__}, "
              f"triton {run.res['env'].get('triton')}", flush=True)
    q, k, v = H.structured_qkv(layout, heads, D, dtype, device)
    scale = 1.0 / math.sqrt(D)
    qt, kt, vt = (tile(x, layout) for x in (q, k, v))
    be = backends.get("triton")
    bcnt = layout.block_counts(device)
    kw_text = {"text_tokens": text}

    cudnn_ms = run.time("cudnn dense fwd", lambda: H.cudnn_attention(q, k, v))
    run.res["cudnn_fwd_ms"] = cudnn_ms

    for qb in (64, 128):
        row: dict[str, Any] = {"query_block": qb}
        run.res["rows"].append(row)
        found = run.attempt(f"q{qb} mask", lambda: H.threshold_for_density(qt, kt, layout, args.density, qb, "triton"))
        if found is None:
            continue
        thr, mask = found
        lists = be.plan(mask)
        row.update(threshold=thr, density=mask.density)
        print(f"[query_block {qb}] threshold {thr:.6f}, kept {mask.density:.4f}", flush=True)

        # ---------------------------------------------------------------- (a) accuracy
        outs: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            o = run.attempt(f"q{qb} bf16 op", lambda: nabla_attention(q, k, v, grid, mask=mask, backend="triton",
                                                                      **kw_text))
            if o is not None:
                outs["bf16"] = o
            o = run.attempt(f"q{qb} fp8 op", lambda: nabla_attention(q, k, v, grid, mask=mask, precision="fp8",
                                                                     **kw_text))
            if o is not None:
                outs["fp8_op"] = o
            for (pv, i8), name in QUANT.items():
                o = run.attempt(f"q{qb} {name} output", lambda pv=pv, i8=i8: untile(
                    attention_fp8(qt, kt, vt, mask, lists, scale, fp8_pv=pv, qk_int8=i8), layout, like=v))
                if o is not None:
                    outs[name] = o
        if outs:
            errs = run.attempt(f"q{qb} errors", lambda: H.masked_errors(q, k, v, mask, outs, scale,
                                                                       heads=args.check_heads, rows=args.check_rows))
            cos = run.attempt(f"q{qb} cosines", lambda: cosines(q, k, v, mask, outs, scale, args.check_heads,
                                                                 args.check_rows))
            if errs:
                bf = errs.get("bf16", {}).get("max_abs")
                for n, e in errs.items():
                    if bf and n != "bf16":
                        e["ratio_vs_bf16_nabla"] = e["max_abs"] / bf
                    if cos and n in cos:
                        e["cosine"] = cos[n]
                row["accuracy"] = errs
                for n, e in errs.items():
                    print(f"  {n:>16}: max {e['max_abs']:.4g}  rel {e['rel']:.4g}  cos {e.get('cosine', math.nan):.6f}"
                          f"  x bf16-nabla {e.get('ratio_vs_bf16_nabla', math.nan):.2f}"
                          f"  x torch-bf16 {e.get('ratio_vs_torch', math.nan):.2f}", flush=True)
        del outs

        # ---------------------------------------------------------------- (b) speed
        t: dict[str, float | None] = {}
        with torch.no_grad():
            t["op_bf16"] = run.time(f"q{qb} op bf16", lambda: nabla_attention(
                q, k, v, grid, thr, query_block=qb, backend="triton", **kw_text))
            t["op_fp8"] = run.time(f"q{qb} op fp8", lambda: nabla_attention(
                q, k, v, grid, thr, query_block=qb, precision="fp8", **kw_text))
            t["kernel_bf16"] = run.time(f"q{qb} kernel bf16 (default)", lambda: be.attention(
                qt, kt, vt, mask, lists, scale))
            t["kernel_bf16_triton"] = run.time(f"q{qb} kernel bf16 triton", lambda: be.attention(
                qt, kt, vt, mask, lists, scale, config=KernelConfig(warp_specialized=False)))
            for (pv, i8), qname in QUANT.items():
                z = run.attempt(f"q{qb} quantize {qname}", lambda pv=pv, i8=i8: quantize(qt, kt, vt, bcnt, fp8_pv=pv,
                                                                                         qk_int8=i8))
                if z is None:
                    continue
                t[f"quant_{qname}"] = run.time(f"q{qb} quantize {qname}", lambda pv=pv, i8=i8: quantize(
                    qt, kt, vt, bcnt, fp8_pv=pv, qk_int8=i8))
                for name, (vpv, vi8, tma, warps, stages) in FP8_VARIANTS.items():
                    if (vpv, vi8) != (pv, i8) or (warps != 4 and qb == 64):
                        continue
                    tma = tma and cuda and torch.cuda.get_device_capability(device) >= (9, 0)
                    t[f"kernel_{name}"] = run.time(f"q{qb} kernel {name}", lambda z=z, tma=tma, w=warps, s=stages:
                                                   forward_quantized(z, dtype, lists.counts, lists.indices, bcnt,
                                                                     scale, tile_m=qb, padded=layout.padded, tma=tma,
                                                                     warps=w, stages=s))
                del z
                t[f"kernel_{qname}+quant"] = run.time(f"q{qb} kernel+quant {qname}", lambda pv=pv, i8=i8: attention_fp8(
                    qt, kt, vt, mask, lists, scale, fp8_pv=pv, qk_int8=i8))
        row["ms"] = t
        if cudnn_ms:
            row["speedup_vs_cudnn"] = {n: cudnn_ms / ms for n, ms in t.items() if ms}
        if t.get("op_bf16") and t.get("op_fp8"):
            row["op_fp8_over_bf16"] = t["op_bf16"] / t["op_fp8"]
        kb = t.get("kernel_bf16_triton")
        if kb:
            row["kernel_speedup_vs_bf16_triton"] = {n: kb / ms for n, ms in t.items()
                                                    if ms and n[7:11] in ("fp8_", "int8")}
        run.save()

    # ---------------------------------------------------------------- table, last
    print("\n=== FP8 NABLA forward", run.res["env"].get("card"), run.res["shape"], "===")
    print(f"cuDNN dense fwd: {cudnn_ms if cudnn_ms else math.nan:.2f} ms")
    for row in run.res["rows"]:
        if "ms" not in row:
            continue
        print(f"\nquery_block {row['query_block']}, kept {row.get('density', math.nan):.4f}")
        print(f"{'column':<28}{'ms':>9}{'x cuDNN':>9}{'x bf16':>8}")
        ref = {"op": row["ms"].get("op_bf16"), "kernel": row["ms"].get("kernel_bf16_triton")}
        for n, ms in row["ms"].items():
            base = ref["op"] if n.startswith("op") else ref["kernel"] if n.startswith("kernel") else None
            sx = f"{cudnn_ms / ms:9.2f}" if (ms and cudnn_ms) else f"{'-':>9}"
            bx = f"{base / ms:8.2f}" if (ms and base) else f"{'-':>8}"
            print(f"{n:<28}{ms if ms else math.nan:9.3f}{sx}{bx}")
        acc = row.get("accuracy", {})
        if acc:
            print(f"{'accuracy (sampled rows)':<20}{'max_abs':>10}{'cosine':>11}{'x bf16':>8}{'x torch':>9}")
            for n, e in acc.items():
                print(f"{n:<20}{e['max_abs']:10.4g}{e.get('cosine', math.nan):11.6f}"
                      f"{e.get('ratio_vs_bf16_nabla', math.nan):8.2f}{e.get('ratio_vs_torch', math.nan):9.2f}")
    print("(x bf16: op columns vs op_bf16, kernel columns vs the bf16 Triton kernel; +quant includes the pre-pass)")
    if run.res["failures"]:
        print("\nFAILURES:")
        for f in run.res["failures"]:
            print("  " + f)
    print(f"\nwrote {args.out} in {time.perf_counter() - run.t0:.0f} s")
    return 1 if run.res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
