"""GPU validation of the flex backend: correctness (fwd + bwd) on odd grids and kernel-option choices.

Run on a CUDA machine from the repo root: ``PYTHONPATH=src python benchmarks/validate_gpu.py``.
Prints one row per (query_block, kernel options): compiles?, forward and gradient error against float64
(and PyTorch's own bf16 error on the same masked problem: the flash-attention rule), time, compile time.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import token_mask  # noqa: E402

from nabla_attn import VideoGrid, nabla_attention, nabla_mask  # noqa: E402
from nabla_attn.backends import flex  # noqa: E402


def masked(q, k, v, allowed, dtype):
    out = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def err(a, b):
    return float((a.double() - b.double()).abs().max())


OPTION_SETS = {
    64: [
        {"BLOCK_M": 64, "BLOCK_N": 64},
        {"BLOCK_M": 64, "BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64},
    ],
    128: [
        {},
        {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64},
    ],
}


def main() -> None:
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = []
    grid, text = VideoGrid(5, 37, 45), 77  # odd everything: edge tiles 5x5, 77 text tokens
    S = grid.num_tokens + text
    modes = sys.argv[1:] or [None]
    for mode, qb, opts in [(mo, qb, o) for mo in modes for qb, sets in OPTION_SETS.items() for o in sets]:
            flex.COMPILE_MODE = None if mode in (None, "default") else mode
            torch._dynamo.reset()  # each option set is its own experiment: keep the recompile count at 0
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, 4, S, 128, device=dev) for _ in range(3))
            q = q + 2 * torch.randn(2, 4, 1, 128, device=dev)
            m = nabla_mask(q, k, grid, 0.5, (1, 3, 3), text, "start", query_block=qb)
            allowed = token_mask(m.__class__(m.kept.cpu(), m.layout, m.query_block), 2, 4).to(dev)
            ref = masked(q, k, v, allowed, torch.float64)
            row = {"mode": mode, "query_block": qb, "options": opts, "density": m.density}
            qb16, kb16, vb16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
            try:
                orig = flex.flex_attention_backend.__defaults__
                flex.flex_attention_backend.__defaults__ = (opts,)
                t0 = time.time()
                out = nabla_attention(qb16, kb16, vb16, grid, text_tokens=text, text_position="start", mask=m, backend="flex")
                g = torch.randn_like(out)
                out.backward(g)
                torch.cuda.synchronize()
                row["compile_s"] = time.time() - t0
                q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
                r64 = masked(q64, k64, v64, allowed, torch.float64)
                r64.backward(g.double())
                qt, kt, vt = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
                rt = masked(qt, kt, vt, allowed, torch.bfloat16)
                rt.backward(g)
                row["fwd_err"], row["torch_bf16_fwd_err"] = err(out, ref), err(rt, ref)
                row["dq_err"], row["torch_dq_err"] = err(qb16.grad, q64.grad), err(qt.grad, q64.grad)
                row["dk_err"], row["torch_dk_err"] = err(kb16.grad, k64.grad), err(kt.grad, k64.grad)
                row["dv_err"], row["torch_dv_err"] = err(vb16.grad, v64.grad), err(vt.grad, v64.grad)
                row["ok"] = all(row[f"{n}_err"] <= 2 * row[f"torch_{'bf16_fwd' if n == 'fwd' else n}_err"] + 1e-3 for n in ("fwd", "dq", "dk", "dv"))
            except Exception as exc:  # report and keep going: this script explores options
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                with open(os.path.join(os.environ.get("OUT", "."), f"tb_{len(rows)}.txt"), "w") as f:
                    f.write(traceback.format_exc()[-12000:])
                # forward alone, to tell a forward failure from a backward one
                try:
                    with torch.no_grad():
                        out = nabla_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid, text_tokens=text, text_position="start", mask=m, backend="flex")
                    row["fwd_only_err"], row["torch_bf16_fwd_err"] = err(out, ref), err(masked(q.bfloat16(), k.bfloat16(), v.bfloat16(), allowed, torch.bfloat16), ref)
                except Exception as exc2:
                    row["fwd_error"] = f"{type(exc2).__name__}: {str(exc2).splitlines()[0][:200]}"
            finally:
                flex.flex_attention_backend.__defaults__ = orig
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "."), "validate_gpu.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("\nqb  options                                   ok    fwd_err/torch   dq_err/torch  compile_s")
    for r in rows:
        o = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
        if "error" in r:
            fwd = f"fwd-only err {r['fwd_only_err']:.2e}/{r['torch_bf16_fwd_err']:.2e}" if "fwd_only_err" in r else r.get("fwd_error", "")[:60]
            print(f"{r['query_block']:<4}{o[:42]:<42} FAIL  {r['error'][:70]} | {fwd}")
        else:
            print(f"{r['query_block']:<4}{o[:42]:<42} {str(r['ok']):<5} {r['fwd_err']:.2e}/{r['torch_bf16_fwd_err']:.2e} {r['dq_err']:.2e}/{r['torch_dq_err']:.2e} {r['compile_s']:.1f}")


if __name__ == "__main__":
    main()
