"""NABLA attention against the best dense kernel on the card (cuDNN SDPA), as a user meets it.

One process, one card, cuDNN dense timed in the same run (forward, forward + backward). Columns
(CUDA-event medians, ``harness.time_ms``):

- ``op`` (the headline): ``nabla_attention(q, k, v, grid, threshold, query_block=...)`` on
  natural-order q, k, v with everything inside the timed call: tiling (which writes the block
  means), the mask with its kv lists, the kernel, untiling. ``fwd+bwd`` runs the backward through
  the op, so gradients reach the natural-order inputs. ``bshd``: the same on the ``[B, S, H, D]``
  memory viewed as ``[B, H, S, D]`` that diffusers' processors hand over.
- ``kernel``: the Triton backend's attention alone on pre-tiled q, k, v, mask and kv lists prebuilt.
- ``tiled``: ``nabla_attention(..., token_order="tiled")``: mask + kernel on pre-tiled input (what
  the pre-refactor harness called "fwd + mask", to compare with older results).
- ``flex``: compiled FlexAttention on the same masks, forward only (kernel alone, and the op).

Points: kept densities 5/10/20/30 % (threshold by bisection, per query block) and equal
thresholds 0.5/0.7/0.9 (the user's knob: each query block reports the density it gets).

Checks, printed last with the JSON already written (exit status 1 if one fails, so a device run is
never lost to an assertion mid-sweep): at 10 %, every kernel's forward max error against float64
on sampled rows <= 2x PyTorch's own low-precision SDPA error on the same masked rows (the
flash-attention rule; dq of the op is reported, not checked); the fused mask equals the eager
definition (``masks.reference_mask``) on all but <= 1e-5 of the table entries; no new dynamo graph
and no new Triton specialisation over ``--calls`` calls with changing masks.

Inputs: ``harness.structured_qkv`` (local attention from random Fourier features of token positions).

    PYTHONPATH=src python benchmarks/bench_attention.py --variants --json attention_h200.json
    PYTHONPATH=src python benchmarks/bench_attention.py --quick --json attention_h200_quick.json
    python benchmarks/bench_attention.py --plot attention_h200.json docs/img/speedup_vs_density.png
    PYTHONPATH=src python benchmarks/bench_attention.py --smoke          # CPU, Triton interpreter
"""

from __future__ import annotations

import cpu_smoke  # first: a smoke run switches Triton's interpreter on before anything loads Triton

SMOKE = cpu_smoke.setup()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

import harness as H  # noqa: E402
from nabla_attn import (  # noqa: E402
    BlockSparseMask, MaskSpec, TokenLayout, VideoGrid, backends, nabla_attention, nabla_mask_tiled, select_backend,
    tile, untile,
)
from nabla_attn.backends.triton import DEFAULT_CONFIG  # noqa: E402
from nabla_attn.masks import reference_mask  # noqa: E402

# KernelConfig variants at 10 %, kernel alone: (name, query block, changed fields, with backward).
VARIANTS: tuple[tuple[str, int, dict[str, Any], bool], ...] = (
    ("default", 128, {}, False), ("triton_fwd", 128, {"warp_specialized": False}, False),
    ("triton_fwd_no_tma", 128, {"warp_specialized": False, "tma": False}, False),
    ("ws_stages_2", 128, {"ws_stages": 2}, False), ("default", 64, {}, False),
    ("triton_fwd", 64, {"ws_q64": False}, False), ("triton_fwd_no_tma", 64, {"ws_q64": False, "tma": False}, False),
    ("default", 128, {}, True), ("bwd_no_tma", 128, {"bwd_tma": False}, True),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="wan14b_720p,wan1.3b_480p,hunyuan_720p", help=f"from {sorted(H.SHAPES)}")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3", help="kept block fractions")
    p.add_argument("--thresholds", default="0.5,0.7,0.9", help="equal-threshold points ('' for none)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--backend", default="auto", help="backend= of the op (headline and tiled columns)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--flex-all-shapes", action="store_true", help="FlexAttention at every shape, not the first only")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--quick", action="store_true", help="first shape at 10%% only: op and kernel, fwd and fwd+bwd")
    p.add_argument("--variants", action="store_true", help="KernelConfig variants at 10%% (first shape)")
    p.add_argument("--calls", type=int, default=50, help="calls with changing masks for the recompile check")
    p.add_argument("--budget-ms", type=float, default=300.0, help="time budget per measurement")
    p.add_argument("--json", default=None, help="write results here (after every shape)")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), default=None, help="only draw the speedup plot")
    p.add_argument("--smoke", action="store_true", help="CPU: Triton interpreter, a toy shape, every code path once")
    args = p.parse_args(argv)
    if args.quick:
        args.densities, args.thresholds, args.no_flex, args.variants, args.calls = "0.1", "", True, False, 10
        args.shapes = args.shapes.split(",")[0]
    if args.smoke:
        args.shapes, args.densities, args.thresholds, args.head_dim, args.calls = "smoke", "0.1", "0.7", 16, 2
        args.backend, args.variants = "triton", True
    return args


@dataclass
class Case:
    """One shape's inputs in every form the columns need, and what its measurements share."""

    name: str
    layout: TokenLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    args: argparse.Namespace
    flex: bool
    info: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.grid, self.text = self.layout.grid, self.layout.text_tokens
        self.scale = 1.0 / math.sqrt(self.q.shape[-1])
        self.nat_b = [H.bshd(x) for x in (self.q, self.k, self.v)]
        self.qt, self.kt, self.vt = (tile(x, self.layout) for x in (self.q, self.k, self.v))
        self.g = torch.randn_like(self.q)
        self.g_b, self.g_t = H.bshd(self.g), tile(self.g, self.layout)
        self.tri = backends.get("triton")
        self.masks10: dict[int, BlockSparseMask] = {}
        self.smoke = self.args.smoke

    def time(self, fn: Callable[[], Any]) -> float:
        return H.time_ms(fn, self.args.budget_ms)

    def op(self, thr: float, qb: int, order: str = "natural", backend: str | None = None) -> Callable[..., torch.Tensor]:
        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return nabla_attention(q, k, v, self.grid, thr, None, self.text, query_block=qb,  # type: ignore[return-value]
                                   backend=backend or self.args.backend, token_order=order)  # type: ignore[arg-type]
        return call


def measure_dense(c: Case) -> None:
    with torch.no_grad():
        c.info["cudnn_fwd_ms"] = c.time(lambda: H.cudnn_attention(c.q, c.k, c.v))
        try:  # diffusers' memory layout; cuDNN takes the strides as they are
            c.info["cudnn_bshd_fwd_ms"] = c.time(lambda: H.cudnn_attention(*c.nat_b))
        except RuntimeError as exc:
            c.info["cudnn_bshd_error"] = str(exc)[:300]
    if not c.args.no_backward:
        leaves = [x.detach().requires_grad_() for x in (c.q, c.k, c.v)]
        c.info["cudnn_fwdbwd_ms"] = c.time(H.grad_step(H.cudnn_attention, leaves, c.g))
    S, heads, D = c.layout.seq_len, c.q.shape[1], c.q.shape[-1]
    c.info["cudnn_fwd_tflops"] = 4.0 * heads * S * S * D / c.info["cudnn_fwd_ms"] / 1e9
    print(f"[{c.name}] S={S} heads={heads}: cuDNN fwd {c.info['cudnn_fwd_ms']:.2f} ms (BSHD view "
          f"{c.info.get('cudnn_bshd_fwd_ms', math.nan):.2f}), fwd+bwd {c.info.get('cudnn_fwdbwd_ms', math.nan):.2f} ms", flush=True)


def measure_point(c: Case, qb: int, point: str, target: float, thr: float, first: bool) -> dict[str, Any]:
    """One (query block, threshold): ``full`` points (the density sweep) fill every column, threshold
    points the op and the kernel forward; the 10 % point also runs the checks."""
    a = c.args
    full, check = point == "density", point == "density" and abs(target - 0.1) < 1e-9
    mask = nabla_mask_tiled(c.qt, c.kt, c.layout, thr, None, query_block=qb, backend=a.backend)
    row: dict[str, Any] = {"shape": c.name, "point": point, "target": target, "query_block": qb, "threshold": thr,
                           "density": mask.density, "backend": select_backend(c.q, a.backend, False, qb)}
    op, op_t, plan = c.op(thr, qb), c.op(thr, qb, "tiled"), c.tri.plan(mask)
    kernel = lambda x, y, z: c.tri.attention(x, y, z, mask, plan, c.scale)  # noqa: E731
    be = backends.get(row["backend"])
    spec = MaskSpec(thr, None, qb)
    with torch.no_grad():
        if first:
            row["op_first_call_s"] = H.first_call_s(lambda: op(c.q, c.k, c.v))
        row["op_fwd_ms"] = c.time(lambda: op(c.q, c.k, c.v))
        row["kernel_fwd_ms"] = c.time(lambda: kernel(c.qt, c.kt, c.vt))
        if full:
            row["bshd_fwd_ms"] = c.time(lambda: op(*c.nat_b))
            row["tiled_fwd_ms"] = c.time(lambda: op_t(c.qt, c.kt, c.vt))
            row["mask_tiled_ms"] = c.time(lambda: be.build_mask(c.qt, c.kt, c.layout, spec))
            row["mask_tiled_peak_mib"] = H.peak_mib(lambda: be.build_mask(c.qt, c.kt, c.layout, spec))
            row["mask_natural"] = H.natural_mask_cost(be, c.q, c.k, c.layout, spec)
        if c.flex:
            measure_flex(c, row, mask, qb, thr, first)
    leaves = [x.detach().requires_grad_() for x in (c.q, c.k, c.v)]
    leaves_t = [x.detach().requires_grad_() for x in (c.qt, c.kt, c.vt)]
    leaves_k = [x.detach().requires_grad_() for x in (c.qt, c.kt, c.vt)]
    leaves_b = [x.transpose(1, 2).detach().requires_grad_() for x in c.nat_b]  # [B, S, H, D] leaves
    if not a.no_backward:
        row["op_fwdbwd_ms"] = c.time(H.grad_step(op, leaves, c.g))
        if full:
            row["bshd_fwdbwd_ms"] = c.time(H.grad_step(lambda x, y, z: op(x.transpose(1, 2), y.transpose(1, 2),
                                                                         z.transpose(1, 2)), leaves_b, c.g_b))
            row["kernel_fwdbwd_ms"] = c.time(H.grad_step(kernel, leaves_k, c.g_t))
            row["tiled_fwdbwd_ms"] = c.time(H.grad_step(op_t, leaves_t, c.g_t))
    if check:
        c.masks10[qb] = mask
        run_checks(c, row, mask, spec, be, op, op_t, kernel, leaves, leaves_b, leaves_k)
    for key in [k for k in row if k.endswith("_ms") and "mask" not in k]:
        base = c.info.get("cudnn_fwdbwd_ms" if "fwdbwd" in key else "cudnn_fwd_ms")
        row[key[:-3] + "_x"] = base / row[key] if base else None
    row["kernel_frac_ideal"] = row["density"] * c.info["cudnn_fwd_ms"] / row["kernel_fwd_ms"]
    print(f"  q{qb} {point} {target:g}: thr {thr:.4g} density {row['density']:.3f}  op fwd {row['op_fwd_ms']:.2f} ms "
          f"({row['op_fwd_x']:.2f}x)  fwd+bwd {row.get('op_fwdbwd_ms', math.nan):.2f} ms "
          f"({row.get('op_fwdbwd_x') or math.nan:.2f}x)  kernel fwd {row['kernel_fwd_ms']:.2f} ms", flush=True)
    return row


def measure_flex(c: Case, row: dict[str, Any], mask: BlockSparseMask, qb: int, thr: float, first: bool) -> None:
    fx = backends.get("flex")
    try:
        if first:
            row["flex_first_call_s"] = H.first_call_s(lambda: fx.attention(c.qt, c.kt, c.vt, mask, None, c.scale))
        row["flex_kernel_fwd_ms"] = c.time(lambda: fx.attention(c.qt, c.kt, c.vt, mask, None, c.scale))
        row["flex_op_fwd_ms"] = c.time(lambda: c.op(thr, qb, backend="flex")(c.q, c.k, c.v))
    except Exception as exc:  # noqa: BLE001 - a Flex compile failure is a result; the sweep goes on
        row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"  flex q{qb} failed: {row['flex_error']}", flush=True)


def run_checks(c: Case, row: dict[str, Any], mask: BlockSparseMask, spec: MaskSpec, be: Any,
               op: Callable[..., torch.Tensor], op_t: Callable[..., torch.Tensor], kernel: Callable[..., torch.Tensor],
               leaves: list[torch.Tensor], leaves_b: list[torch.Tensor], leaves_k: list[torch.Tensor]) -> None:
    """Errors against float64 (outputs of every kernel, dq of the op), fused vs eager table, stages."""
    lay, qb = c.layout, mask.query_block
    with torch.no_grad():
        outs = {"op": op(c.q, c.k, c.v), "bshd": op(*c.nat_b), "kernel": untile(kernel(c.qt, c.kt, c.vt), lay),
                "tiled": untile(op_t(c.qt, c.kt, c.vt), lay)}
        if c.flex and "flex_error" not in row:
            outs["flex"] = untile(backends.get("flex").attention(c.qt, c.kt, c.vt, mask, None, c.scale), lay)
    dqs = {}
    if leaves[0].grad is not None:
        dqs = {"op": leaves[0].grad, "bshd": leaves_b[0].grad.transpose(1, 2), "kernel": untile(leaves_k[0].grad, lay)}
    errs = H.masked_errors(c.q, c.k, c.v, mask, outs, c.scale, gout=c.g if dqs else None, dqs=dqs,
                           rows=64 if c.smoke else 2048)
    row["errors"] = errs
    c.failures += H.flash_rule_failures(errs, f"{c.name} q{qb}", floor=1e-4 if c.q.dtype == torch.float32 else 0.0)
    del outs, dqs
    with torch.no_grad():
        eager, fused = reference_mask(c.qt, c.kt, lay, spec), be.build_mask(c.qt, c.kt, lay, spec)[0]
        diff, total = int((eager.kept != fused.kept).sum()), eager.kept.numel()
        row["mask_vs_eager"] = {"differing": diff, "total": total, "backend": be.name}
        if diff > 1e-5 * total:
            c.failures.append(f"{c.name} q{qb} fused mask differs from masks.reference_mask in {diff} of {total} entries")
        row["eager_mask_ms"] = c.time(lambda: reference_mask(c.qt, c.kt, lay, spec))
        row["eager_mask_peak_mib"] = H.peak_mib(lambda: reference_mask(c.qt, c.kt, lay, spec))
        if be.name != "reference":
            row["mask_stages"] = H.mask_stage_times(be, c.qt, c.kt, lay, spec)
    ratios = {n: round(e.get("ratio_vs_torch", 1.0), 2) for n, e in errs.items() if n != "torch_sdpa_lowp"}
    print(f"  q{qb} errors (max-abs ratio to torch low precision): {ratios}; dq of the op "
          f"{errs.get('op', {}).get('dq_ratio_vs_torch', math.nan):.2f}; mask vs eager: {diff} of {total} differ", flush=True)


def recompile_check(c: Case) -> dict[str, Any]:
    """Calls with a new mask each (the threshold moves): dynamo graphs and Triton specialisations must not grow."""
    n = c.args.calls
    thresholds = [0.05 + 0.5 * i / max(1, n - 1) for i in range(n)]
    kinds = [(c.args.backend, 64), (c.args.backend, 128)] + ([("flex", 128)] if c.flex else [])
    out: dict[str, Any] = {}
    for backend, qb in kinds:
        g0, t0 = H.dynamo_graphs(), H.triton_compiles()
        try:
            with torch.no_grad():
                for thr in thresholds:
                    c.op(thr, qb, backend=backend)(c.q, c.k, c.v)
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            c.failures.append(f"{c.name} {backend} q{qb}: calls with changing masks failed: {type(exc).__name__}: {exc}")
            continue
        H.sync()
        rec = {"calls": n, "dynamo_new_graphs": H.dynamo_graphs() - g0, "triton_new_specialisations": H.triton_compiles() - t0}
        out[f"{backend}_q{qb}"] = rec
        if rec["dynamo_new_graphs"] or rec["triton_new_specialisations"]:
            c.failures.append(f"{c.name} {backend} q{qb}: recompiled over {n} calls with changing masks: {rec}")
    print(f"  recompiles over changing masks: {out}", flush=True)
    return out


def run_variants(c: Case) -> list[dict[str, Any]]:
    """Kernel-only KernelConfig variants on the 10 % masks (each variant compiles its own kernels)."""
    rows: list[dict[str, Any]] = []
    ref: dict[int, torch.Tensor] = {}
    for name, qb, fields_, bwd in VARIANTS:  # forward rows also pass the flash-attention rule
        mask = c.masks10[qb]
        plan, cfg = c.tri.plan(mask), replace(DEFAULT_CONFIG, **fields_)
        fn = lambda x, y, z: c.tri.attention(x, y, z, mask, plan, c.scale, config=cfg)  # noqa: E731, B023
        r: dict[str, Any] = {"name": name, "query_block": qb, "changed": fields_, "config": asdict(cfg)}
        try:
            if bwd:
                leaves = [x.detach().requires_grad_() for x in (c.qt, c.kt, c.vt)]
                r["kernel_fwdbwd_ms"] = c.time(H.grad_step(fn, leaves, c.g_t))
            else:
                with torch.no_grad():
                    out = fn(c.qt, c.kt, c.vt)
                    ref.setdefault(qb, out)
                    r["max_abs_diff_vs_default"] = float((out.float() - ref[qb].float()).abs().max())
                    r["kernel_fwd_ms"] = c.time(lambda: fn(c.qt, c.kt, c.vt))
                    r["frac_ideal"] = mask.density * c.info["cudnn_fwd_ms"] / r["kernel_fwd_ms"]
                errs = H.masked_errors(c.q, c.k, c.v, mask, {name: untile(out, c.layout)}, c.scale,
                                       rows=64 if c.smoke else 2048)
                r["err_ratio_vs_torch"] = errs[name].get("ratio_vs_torch")
                c.failures += H.flash_rule_failures(errs, f"{c.name} variant {name} q{qb}",
                                                    floor=1e-4 if c.q.dtype == torch.float32 else 0.0)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
            r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(r)
        print(f"  variant {name} q{qb}{' fwd+bwd' if bwd else ''}: "
              f"{r.get('kernel_fwdbwd_ms', r.get('kernel_fwd_ms', math.nan)):.2f} ms {r.get('error', '')}", flush=True)
    return rows


def run_shape(name: str, args: argparse.Namespace, dtype: torch.dtype, device: torch.device, flex: bool,
              result: dict[str, Any]) -> Case:
    (T, Hh, W), text, heads = H.SHAPES[name]
    layout = TokenLayout(VideoGrid(T, Hh, W), text)
    c = Case(name, layout, *H.structured_qkv(layout, heads, args.head_dim, dtype, device), args=args, flex=flex)
    c.info.update(grid=[T, Hh, W], text_tokens=text, heads=heads, seq_len=layout.seq_len, blocks=layout.num_blocks)
    measure_dense(c)
    bisect = "reference" if args.smoke else args.backend  # the eager table is quick on the CPU
    points = [("density", float(d)) for d in args.densities.split(",") if d]
    points += [("threshold", float(t)) for t in args.thresholds.split(",") if t]
    first = {64: True, 128: True}
    for point, target in points:
        for qb in (128, 64):
            thr = target if point == "threshold" else H.threshold_for_density(c.qt, c.kt, layout, target, qb, bisect)[0]
            result["rows"].append(measure_point(c, qb, point, target, thr, first[qb]))
            first[qb] = False
    if 128 in c.masks10 and 64 in c.masks10:
        thr64 = next(r["threshold"] for r in result["rows"] if r["shape"] == name and r["point"] == "density"
                     and r["target"] == 0.1 and r["query_block"] == 64)
        c.info["qb128_density_at_qb64_threshold_10pct"] = nabla_mask_tiled(
            c.qt, c.kt, layout, thr64, None, query_block=128, backend=args.backend).density
        if args.variants and "variants" not in result:
            result["variants"] = {"shape": name, "rows": run_variants(c)}
    if args.calls > 0:
        c.info["recompiles"] = recompile_check(c)
    return c


def print_table(result: dict[str, Any], failures: list[str]) -> None:
    """Short, printed last (a device call returns the tail of the output): ms (x cuDNN)."""
    print(f"\nNABLA vs cuDNN dense on {result['card']} ({result['dtype']}, D={result['head_dim']}); "
          "op = nabla_attention on natural-order input, everything in the call; kernel = pre-tiled, mask prebuilt")

    def cell(r: dict[str, Any], key: str) -> str:
        ms, x = r.get(f"{key}_ms"), r.get(f"{key}_x")
        return f"{ms:7.2f} ({x:5.2f})" if ms and x else f"{'-':>15s}"

    cols = ("op_fwd", "op_fwdbwd", "bshd_fwd", "bshd_fwdbwd", "kernel_fwd", "kernel_fwdbwd", "tiled_fwd", "flex_kernel_fwd")
    for s, info in result["shapes"].items():
        print(f"{s}: cuDNN fwd {info['cudnn_fwd_ms']:.2f} ms, fwd+bwd {info.get('cudnn_fwdbwd_ms', math.nan):.2f} ms")
        print(f"{'qb':>4} {'point':>9} {'dens':>5} " + " ".join(f"{k:>15s}" for k in cols))
        for r in (r for r in result["rows"] if r["shape"] == s):
            print(f"{r['query_block']:>4} {r['point'][:3]}={r['target']:<5g} {r['density']:5.3f} "
                  + " ".join(cell(r, k) for k in cols))
        for r in (r for r in result["rows"] if r["shape"] == s and r.get("mask_vs_eager")):
            nat = r.get("mask_natural") or {}
            print(f"  q{r['query_block']} 10%: mask on natural input {nat.get('mask_cost_ms', math.nan):.2f} ms "
                  f"({100 * nat.get('mask_cost_ms', math.nan) / r['op_fwd_ms']:.1f}% of the op fwd), on pre-tiled "
                  f"{r['mask_tiled_ms']:.2f} ms, extra peak {r['mask_tiled_peak_mib']:.0f} MiB (from the means "
                  f"{nat.get('mask_from_means_peak_mib', math.nan):.0f}); eager {r['eager_mask_ms']:.2f} ms; "
                  f"{r['mask_vs_eager']['differing']} of {r['mask_vs_eager']['total']} entries differ")
    print("CHECKS " + ("PASSED" if not failures else f"FAILED ({len(failures)}):"))
    for f in failures:
        print("  " + f)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        H.plot(*args.plot)
        print(f"wrote {args.plot[1]}")
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_attention needs a CUDA GPU (or --smoke for a CPU check of the script)", file=sys.stderr)
        return 2
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = 64  # a sweep must never fall back to eager flex (S x S scores)
    H.install_compile_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.dtype)
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in H.SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(H.SHAPES)}")
    result: dict[str, Any] = {**H.environment(device), "dtype": str(dtype).replace("torch.", ""),
                              "head_dim": args.head_dim, "args": vars(args), "inputs": H.structured_qkv.__doc__,
                              "default_config": asdict(DEFAULT_CONFIG), "shapes": {}, "rows": []}
    print(f"card: {result['card']}, torch {torch.__version__}, {result['dtype']}, head_dim {args.head_dim}", flush=True)
    failures: list[str] = []
    for i, s in enumerate(shapes):
        flex = not args.no_flex and (args.flex_all_shapes or i == 0)
        c = run_shape(s, args, dtype, device, flex, result)
        result["shapes"][s] = c.info
        failures += c.failures
        result["failures"] = failures
        if args.json:  # partial results survive a time-out
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
        del c
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(result, failures)
    if args.json:
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
