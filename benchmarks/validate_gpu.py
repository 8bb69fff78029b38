"""GPU validation of the flex backend: correctness (forward and backward) on an odd grid, per
query block and FlexAttention kernel-option set.

One row per (query_block, kernel options): does it compile, forward and gradient max errors
against float64 next to PyTorch's own bf16 error on the same masked problem (the flash-attention
rule: ours <= 2x theirs), first-call (compile) seconds. The backend picks the compile mode itself
(``max-autotune-no-cudagraphs`` when a backward follows). The flex backend refuses a backward with
64-token query blocks (it failed to compile on torch 2.11 / H200); this script calls the backend's
attention directly, so that row re-tests the claim on the installed torch. 128-token rows run
first: a failure that poisons the CUDA context then costs only the rows after it.

    PYTHONPATH=src python benchmarks/validate_gpu.py                # writes $OUT/validate_gpu.json
    PYTHONPATH=src python benchmarks/validate_gpu.py --smoke        # CPU: forward only (no CPU backward)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any

import torch
import torch._dynamo

import harness as H
from nabla_attn import BLOCK_TOKENS, BlockSparseMask, TokenLayout, VideoGrid, backends, nabla_mask, tile, untile

OPTION_SETS: dict[int, list[dict[str, int]]] = {
    128: [{}, {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64}],
    64: [{"BLOCK_M": 64, "BLOCK_N": 64},
         {"BLOCK_M": 64, "BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64}],
}


def token_mask(mask: BlockSparseMask, batch: int, heads: int) -> torch.Tensor:
    """Bool ``[B, H, S, S]`` over natural token order: pair (i, j) is allowed iff the table keeps
    (query block of i, key block of j)."""
    blk = H.natural_blocks(mask.layout, mask.kept.device)
    kept = mask.kept.expand(batch, heads, -1, -1)
    return kept[:, :, blk // (mask.query_block // BLOCK_TOKENS)][:, :, :, blk]


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy grid, forward only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("validate_gpu needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    backward = dev == "cuda"  # FlexAttention has no CPU backward
    low = torch.bfloat16 if dev == "cuda" else torch.float32
    grid, text, (B, nh, D) = VideoGrid(5, 37, 45), 77, (2, 4, 128)  # odd everything: 5x5 edge tiles, 77 text tokens
    sets = OPTION_SETS
    if args.smoke:
        grid, text, (B, nh, D), sets = VideoGrid(2, 9, 10), 5, (1, 2, 16), {128: [{}], 64: [{}]}
    layout = TokenLayout(grid, text, "start")
    S, scale, fx = layout.seq_len, D ** -0.5, backends.get("flex")
    out_dir = os.environ.get("OUT", tempfile.gettempdir() if args.smoke else ".")
    os.makedirs(out_dir, exist_ok=True)
    print(H.environment(torch.device(dev)), flush=True)
    rows: list[dict[str, Any]] = []
    for qb, opts in [(qb, o) for qb, option_sets in sets.items() for o in option_sets]:
        torch._dynamo.reset()  # each option set is its own experiment: keep the recompile count at 0
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, nh, S, D, device=dev) for _ in range(3))
        q = q + 2 * torch.randn(B, nh, 1, D, device=dev)
        m = nabla_mask(q, k, grid, 0.5, (1, 3, 3), text, "start", query_block=qb)
        allowed = token_mask(m, B, nh)
        ref = masked(q, k, v, allowed, torch.float64)
        row: dict[str, Any] = {"query_block": qb, "options": opts, "density": m.density}

        def flex(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            ts = [tile(x, layout) for x in (a, b, c)]
            return untile(fx.attention(*ts, m, None, scale, kernel_options=opts), layout)  # noqa: B023

        ql, kl, vl = (t.to(low).requires_grad_(backward) for t in (q, k, v))
        try:
            t0 = time.time()
            out = flex(ql, kl, vl)
            g = torch.randn_like(out)
            if backward:
                out.backward(g)
            H.sync()
            row["compile_s"] = time.time() - t0
            row["fwd_err"], row["torch_fwd_err"] = err(out, ref), err(masked(q, k, v, allowed, low), ref)
            names = ["fwd"]
            if backward:
                q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
                masked(q64, k64, v64, allowed, torch.float64).backward(g.double())
                qt, kt, vt = (t.detach().to(low).requires_grad_() for t in (q, k, v))
                masked(qt, kt, vt, allowed, low).backward(g)
                for n, ours, theirs, exact in (("dq", ql, qt, q64), ("dk", kl, kt, k64), ("dv", vl, vt, v64)):
                    row[f"{n}_err"], row[f"torch_{n}_err"] = err(ours.grad, exact.grad), err(theirs.grad, exact.grad)
                names += ["dq", "dk", "dv"]
            floor = 1e-4 if low == torch.float32 else 1e-3
            row["ok"] = all(row[f"{n}_err"] <= max(2 * row[f"torch_{n}_err"], floor) for n in names)
        except Exception as exc:  # report and keep going: this script explores options
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            with open(os.path.join(out_dir, f"tb_{len(rows)}.txt"), "w") as f:
                f.write(traceback.format_exc()[-12000:])
            try:  # the forward alone tells a forward failure from a backward one
                with torch.no_grad():
                    row["fwd_only_err"] = err(flex(q.to(low), k.to(low), v.to(low)), ref)
            except Exception as exc2:  # noqa: BLE001
                row["fwd_error"] = f"{type(exc2).__name__}: {str(exc2).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(out_dir, "validate_gpu.json"), "w") as f:  # after every row: a crash keeps the rest
            json.dump({**H.environment(torch.device(dev)), "rows": rows}, f, indent=1)
    print("\nqb  options                                   ok    fwd_err/torch        dq_err/torch         compile_s")
    for r in rows:
        o = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
        if "error" in r:
            fwd = f"fwd-only err {r['fwd_only_err']:.2e}" if "fwd_only_err" in r else r.get("fwd_error", "")[:60]
            print(f"{r['query_block']:<4}{o[:42]:<42} FAIL  {r['error'][:70]} | {fwd}")
        else:
            dq = f"{r['dq_err']:.2e}/{r['torch_dq_err']:.2e}" if "dq_err" in r else "-"
            print(f"{r['query_block']:<4}{o[:42]:<42} {str(r['ok']):<5} {r['fwd_err']:.2e}/{r['torch_fwd_err']:.2e}  "
                  f"{dq:<20} {r['compile_s']:.1f}")
    bad = [f"q{r['query_block']} {r['options'] or 'default'}" for r in rows if not r.get("ok")]
    print("all rows within the flash-attention rule" if not bad else f"outside the rule or failed: {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
