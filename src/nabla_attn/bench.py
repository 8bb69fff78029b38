"""``nabla bench``: GPU benchmark of NABLA attention against the best dense kernel (cuDNN SDPA).

Everything runs in one process, on one card: the dense cuDNN baseline (forward and forward +
backward), compiled FlexAttention (128x64 and 64x64 blocks) and our Triton kernel at several kept
densities, the mask build (fused Triton builder and the eager recipe), its extra peak memory,
50 calls with changing masks (recompilations counted), first-call compile times, and the error of
every kernel against a float64 reference under the flash-attention rule (max error <= 2x that of
PyTorch's own bf16 SDPA on the same masked problem). Prints a table and writes JSON.

Inputs: random q, k give near-uniform block maps, so the benchmark uses *structured* q and k:
random Fourier features of each token's (t, h, w) position, ``cos(W x + b)``, whose dot products
approximate a Gaussian kernel of token distance (local attention, as in trained video DiTs), with
per-head length scales and added noise. The NABLA threshold is then found by bisection so the
mask lands at each requested density (kept fraction of the block table actually computed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from .grid import BLOCK_TOKENS, TokenLayout, VideoGrid, tile, untile
from .masks import BlockSparseMask, _group_rows, _with_text, cdf_keep, pool_blocks

# Feature amplitude: block-level logits of ~5-15, densities 1-80% for thresholds 0.7-0.999.
AMP = 1.0
SHAPES: dict[str, tuple[tuple[int, int, int], int, int]] = {
    # name: ((frames, height, width) latent grid, text tokens, heads)
    "wan14b_720p": ((21, 40, 80), 0, 40),
    "wan1.3b_480p": ((21, 30, 52), 0, 12),
    "hunyuan_720p": ((33, 45, 80), 256, 24),
    "smoke": ((3, 13, 22), 7, 2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="wan14b_720p,wan1.3b_480p,hunyuan_720p",
                        help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.3", help="kept block fractions")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--flex-all-shapes", action="store_true",
                        help="FlexAttention at every shape (default: the first shape only; each shape compiles anew)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--quick", action="store_true", help="first shape, 10%% density, fewer extras")
    parser.add_argument("--variants", action="store_true", help="also sweep Triton kernel configs at 10%%")
    parser.add_argument("--check", action="store_true", help="small fwd+bwd correctness check of every kernel config first")
    parser.add_argument("--calls", type=int, default=50, help="calls with changing masks for the recompile count")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), default=None,
                        help="only draw speedup vs density from a results JSON (needs matplotlib)")


# ----------------------------------------------------------------------------------------- timing
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], budget_ms: float = 400.0, max_reps: int = 30) -> float:
    """Median time of ``fn`` (ms) after one warm-up call; CUDA events on the GPU."""
    fn()
    _sync()
    if not torch.cuda.is_available():
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    est = max(start.elapsed_time(stop), 1e-3)
    reps = int(min(max_reps, max(3, budget_ms / est)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak device memory ``fn`` allocates beyond what was allocated before (MiB; NaN on the CPU)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return peak


def first_call_s(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- inputs
def structured_qkv(layout: TokenLayout, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled ``[1, H, tiled_len, D]`` q, k, v with local (distance-kernel) attention structure."""
    g = layout.grid
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nat = torch.arange(g.num_tokens, device=device)
    pos = torch.stack([nat // (g.height * g.width), (nat // g.width) % g.height, nat % g.width], 1).float()
    shape = (1, heads, layout.seq_len, head_dim)
    q = torch.empty(shape, dtype=dtype, device=device)
    k = torch.empty(shape, dtype=dtype, device=device)
    v = torch.randn(shape, generator=None, dtype=dtype, device=device)
    for h in range(heads):
        # Length scales (frames, rows, cols) grow with the head index: narrow to broad attention.
        ell = torch.tensor([1.0 + 0.15 * h, 4.0 + 0.8 * h, 4.0 + 0.8 * h])
        w = (torch.randn(head_dim, 3, generator=gen) / ell).to(device)
        b = (torch.rand(head_dim, generator=gen) * 2 * math.pi).to(device)
        feat = torch.cos(pos @ w.T + b) * math.sqrt(2.0)  # E[feat(x).feat(y)] ~ D * kernel(x - y)
        amp = AMP
        qh = amp * feat + 0.5 * torch.randn(feat.shape, device=device)
        kh = amp * feat + 0.5 * torch.randn(feat.shape, device=device)
        text = layout.text_tokens
        vid = slice(0, g.num_tokens) if layout.text_position == "end" else slice(text, text + g.num_tokens)
        q[0, h, vid] = qh.to(dtype)
        k[0, h, vid] = kh.to(dtype)
        if text:
            tx = slice(g.num_tokens, None) if layout.text_position == "end" else slice(0, text)
            q[0, h, tx] = torch.randn(text, head_dim, device=device).to(dtype)
            k[0, h, tx] = torch.randn(text, head_dim, device=device).to(dtype)
    return tile(q, layout), tile(k, layout), tile(v, layout)


# ------------------------------------------------------------------------------------------ masks
def eager_mask(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, threshold: float, query_block: int) -> BlockSparseMask:
    """The paper's recipe as written in masks.py (pool, softmax, sort-based CDF cut), always eager."""
    nv = layout.num_video_blocks
    with torch.no_grad():
        qa = pool_blocks(q, layout)[:, :, :nv]
        ka = pool_blocks(k, layout)[:, :, :nv]
        scores = qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1])
        video = cdf_keep(torch.softmax(scores, dim=-1), threshold)
        kept = _group_rows(_with_text(video, layout), query_block)
    return BlockSparseMask(kept, layout, query_block)


def fast_mask(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, threshold: float, query_block: int) -> BlockSparseMask:
    from .kernels.mask_build import build_nabla_mask_fast

    return build_nabla_mask_fast(q, k, layout, threshold, None, query_block=query_block)


def mask_breakdown(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, threshold: float) -> dict[str, float]:
    """Time the fused builder's stages: pooling, the score product, the row kernel (+ lists)."""
    from .kernels.mask_build import block_scores, pool_blocks_pair

    nv = layout.num_video_blocks
    qa, ka = pool_blocks_pair(q, k, layout, nv)
    out = {"pool_q_and_k": time_ms(lambda: pool_blocks_pair(q, k, layout, nv)),
           "scores_matmul": time_ms(lambda: block_scores(qa, ka))}
    out["total"] = time_ms(lambda: fast_mask(q, k, layout, threshold, 64))
    out["rows_kernel_and_rest"] = out["total"] - out["pool_q_and_k"] - out["scores_matmul"]
    return out


def natural_input_mask_cost(qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, threshold: float,
                            query_block: int) -> dict[str, float]:
    """What the mask adds to a call on natural-order q and k, which the op tiles anyway: its tiling
    pass also writes the block means (``tile_pooled``), so the mask costs the pooled tiling minus
    plain tiling plus the mask from those means. Empty where the tiling kernel does not run."""
    from .grid import tile_pooled
    from .kernels.mask_build import build_nabla_mask_fast

    q, k = untile(qt, layout), untile(kt, layout)
    (_, qa), (_, ka) = tile_pooled(q, layout), tile_pooled(k, layout)
    if qa is None or ka is None:
        return {}
    out = {"tile_qk_ms": time_ms(lambda: (tile(q, layout), tile(k, layout))),
           "tile_qk_pooled_ms": time_ms(lambda: (tile_pooled(q, layout), tile_pooled(k, layout))),
           "mask_from_means_ms": time_ms(lambda: build_nabla_mask_fast(qt, kt, layout, threshold, None,
                                                                       query_block=query_block, means=(qa, ka)))}
    out["mask_cost_ms"] = out["tile_qk_pooled_ms"] - out["tile_qk_ms"] + out["mask_from_means_ms"]
    return out


def threshold_for_density(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, density: float,
                          query_block: int, iters: int = 16) -> tuple[float, BlockSparseMask]:
    """Bisection on the threshold so the block table's kept fraction lands at ``density``."""
    # Bisection on log(1 - threshold): density falls as the dropped mass 1 - threshold grows.
    lo, hi = math.log(1e-7), math.log(0.9999)
    best: tuple[float, BlockSparseMask] | None = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        thr = 1.0 - math.exp(mid)
        m = fast_mask(q, k, layout, thr, query_block)
        d = m.density
        if best is None or abs(d - density) < abs(best[1].density - density):
            best = (thr, m)
        if d > density:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------- kernels
def _dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _attn_fn(name: str, mask: BlockSparseMask, scale: float, config: Any = None) -> Callable:
    if name.startswith("triton"):
        from .backends.triton_kernel import triton_attention

        return lambda q, k, v: triton_attention(q, k, v, mask, scale, config)
    from .backends.flex import flex_attention_backend

    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if mask.query_block == 64 else None
    return lambda q, k, v: flex_attention_backend(q, k, v, mask, scale, opts)


def _recompiles() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - counters are internal; report -1 if they move
        return -1


def _triton_variants() -> int:
    """Compiled specialisations of our kernels so far (grows only on a recompile)."""
    from .kernels import attention as ka, mask_build as mb

    fns = []
    try:
        from .kernels import attention_ws as kws

        fns.append(kws._attn_fwd_ws)
    except ImportError:  # a Triton without Gluon
        pass
    n = 0
    for fn in (*fns, ka._attn_fwd, ka._attn_bwd_dq, ka._attn_bwd_dkdv, mb._nabla_rows_kernel, mb._compact_kernel,
               mb._pool_kernel, mb._scores_kernel):
        caches = getattr(fn, "device_caches", None)
        if caches:
            n += sum(len(c[0]) for c in caches.values())
    return n


# ------------------------------------------------------------------------------------------ error
def masked_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, outs: dict[str, torch.Tensor],
                  scale: float, heads: int = 2, rows: int = 2048, seed: int = 1) -> dict[str, dict[str, float]]:
    """Max and relative errors against float64 on sampled query rows, plus PyTorch's own bf16 SDPA."""
    layout = mask.layout
    gen = torch.Generator(device="cpu").manual_seed(seed)
    valid = layout.valid_tokens(q.device)
    cand = torch.nonzero(valid).squeeze(1).cpu()
    pick = cand[torch.randperm(len(cand), generator=gen)[:rows]].sort().values.to(q.device)
    kept = mask.kept
    res: dict[str, list[tuple[float, float, float]]] = {n: [] for n in [*outs, "torch_sdpa_lowp"]}
    for h in range(min(heads, q.shape[1])):
        hm = 0 if kept.shape[1] == 1 else h
        allowed = kept[0, hm][pick // mask.query_block][:, torch.arange(q.shape[2], device=q.device) // BLOCK_TOKENS]
        allowed &= valid[None, :]
        has = allowed.any(1)
        qs, kk, vv = q[0, h, pick].double(), k[0, h].double(), v[0, h].double()
        s = (qs @ kk.T) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        ref = torch.softmax(s, -1) @ vv
        ref = torch.where(has[:, None], ref, torch.zeros_like(ref))
        del s
        with torch.no_grad():
            low = torch.nn.functional.scaled_dot_product_attention(
                q[0, h, pick][None, None], k[0, h][None, None], v[0, h][None, None], attn_mask=allowed[None, None],
                scale=scale)[0, 0]
        cands = {n: o[0, h, pick] for n, o in outs.items()}
        cands["torch_sdpa_lowp"] = low
        for n, o in cands.items():
            d = (o.double() - ref)[has]
            res[n].append((float(d.abs().max()), float(d.norm()), float(ref[has].norm())))
    out: dict[str, dict[str, float]] = {}
    for n, vals in res.items():
        out[n] = {"max_abs": max(x[0] for x in vals), "rel": math.sqrt(sum(x[1] ** 2 for x in vals)) / math.sqrt(sum(x[2] ** 2 for x in vals))}
    base = out["torch_sdpa_lowp"]["max_abs"]
    for n in outs:
        out[n]["ratio_vs_torch"] = out[n]["max_abs"] / base if base > 0 else float("inf")
    return out


# ------------------------------------------------------------------------------------------ sweep
@dataclass
class Row:
    shape: str
    kernel: str
    query_block: int
    density: float
    threshold: float
    fwd_ms: float
    mask_ms: float
    fwd_total_ms: float
    fwdbwd_total_ms: float | None
    eff_tflops: float
    speedup_fwd: float
    speedup_fwdbwd: float | None
    frac_ideal: float
    compile_s: float | None
    mask_peak_mib: float


def sweep_variants(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, layout: TokenLayout, scale: float,
                   gout: torch.Tensor) -> tuple[Any, list[dict[str, Any]]]:
    """Time Triton kernel configurations at 10% density; return the best combination and all rows."""
    from .backends.triton_kernel import _env_config

    _, m = threshold_for_density(qt, kt, layout, 0.1, 128)
    _, m64 = threshold_for_density(qt, kt, layout, 0.1, 64)
    D0 = _env_config()
    # 128-row tables run the warp-specialised kernel by default; the Triton kernel's own options
    # are swept with it switched off.
    tk = replace(D0, warp_specialized=False)
    fwd_cfgs = [D0, tk, replace(tk, tma=False), replace(tk, prefetch=True), replace(D0, ws_pair=False, ws_stages=4),
                replace(D0, ws_stages=2)]
    bwd_cfgs = [D0, replace(D0, bwd_tma=False), replace(D0, bwd_tile_m=128, dq_warps=8, dkdv_warps=8),
                replace(D0, dq_stages=3, dkdv_stages=3), replace(D0, dq_stages=1, dkdv_stages=1)]
    rows: list[dict[str, Any]] = []
    fwd_times: list[float] = []
    bwd_times: list[float] = []
    for cfg in fwd_cfgs:
        try:
            f = _attn_fn("triton", m, scale, cfg)
            f64 = _attn_fn("triton", m64, scale, cfg)
            f64s = _attn_fn("triton", m64, scale, replace(cfg, tile_m_for_64=128))
            r = {"config": asdict(cfg), "fwd_q128_ms": time_ms(lambda: f(qt, kt, vt), budget_ms=200),
                 "fwd_q64_ms": time_ms(lambda: f64(qt, kt, vt), budget_ms=200),
                 "fwd_q64_tile128_submask_ms": time_ms(lambda: f64s(qt, kt, vt), budget_ms=200)}
            fwd_times.append(r["fwd_q128_ms"])
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            r = {"config": asdict(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"}
            fwd_times.append(float("inf"))
        rows.append(r)
        print("  variant", r, flush=True)
    for cfg in bwd_cfgs:
        try:
            a, b, c = (x.clone().requires_grad_() for x in (qt, kt, vt))
            f = _attn_fn("triton", m, scale, cfg)

            def step() -> None:
                for x in (a, b, c):
                    x.grad = None
                f(a, b, c).backward(gout)

            r = {"config": asdict(cfg), "fwdbwd_q128_ms": time_ms(step, budget_ms=300)}
            bwd_times.append(r["fwdbwd_q128_ms"])
            del a, b, c
        except Exception as e:  # noqa: BLE001
            r = {"config": asdict(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"}
            bwd_times.append(float("inf"))
        rows.append(r)
        print("  variant", r, flush=True)
    # Keep the library default unless a variant is clearly (> 3%) faster.
    fi = min(range(len(fwd_cfgs)), key=lambda i: fwd_times[i])
    bi = min(range(len(bwd_cfgs)), key=lambda i: bwd_times[i])
    fc = fwd_cfgs[fi] if fwd_times[fi] < 0.97 * fwd_times[0] else D0
    bc = bwd_cfgs[bi] if bwd_times[bi] < 0.97 * bwd_times[0] else D0
    chosen = replace(fc, bwd_tile_m=bc.bwd_tile_m, bwd_tma=bc.bwd_tma, dq_warps=bc.dq_warps, dq_stages=bc.dq_stages,
                     dkdv_warps=bc.dkdv_warps, dkdv_stages=bc.dkdv_stages)
    return chosen, rows


def _check_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[dict[str, Any]]:
    """Small fwd+bwd check of every kernel configuration against the float64 reference."""
    from .backends.reference import reference_attention
    from .backends.triton_kernel import KernelConfig, triton_attention

    layout = TokenLayout(VideoGrid(3, 13, 22), 7)
    torch.manual_seed(0)
    B, H, D = 2, 3, head_dim
    q, k, v = (torch.randn(B, H, layout.tiled_len, D, device=device, dtype=dtype) for _ in range(3))
    valid = layout.valid_tokens(device)
    out = []
    tk = KernelConfig(warp_specialized=False)  # the Triton forward for 128-row tables too
    for qb, cfg in ((128, replace(tk, tma=False)), (128, replace(tk, pair=True)), (128, tk),
                    (64, KernelConfig(tma=False)), (64, KernelConfig(tile_m_for_64=128)),
                    (64, KernelConfig(tile_m_for_64=128, pair=True)), (128, KernelConfig()), (64, KernelConfig()),
                    (128, KernelConfig(ws_pair=False, ws_stages=4)),
                    (64, KernelConfig(lazy_rescale=True)), (128, replace(tk, lazy_rescale=True)),
                    (64, KernelConfig(pad_branch=True)), (64, KernelConfig(prefetch=True))):
        mask = fast_mask(q, k, layout, 0.6, qb)
        a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
        o = triton_attention(a, b, c, mask, 0.2, cfg)
        go = torch.randn_like(o)
        o.backward(go)
        a2, b2, c2 = (x.detach().double().requires_grad_() for x in (q, k, v))
        r = reference_attention(a2, b2, c2, mask, 0.2)
        r.backward(go.double())
        # PyTorch's own low-precision error on the same problem: reference in the input dtype.
        low = reference_attention(q.float(), k.float(), v.float(), mask, 0.2).to(dtype)

        def rel(x: torch.Tensor, y: torch.Tensor) -> float:
            return float((x.double()[..., valid, :] - y[..., valid, :]).norm() / y[..., valid, :].norm())

        out.append({"query_block": qb, "config": asdict(cfg), "out": rel(o, r), "dq": rel(a.grad, a2.grad),
                    "dk": rel(b.grad, b2.grad), "dv": rel(c.grad, c2.grad), "torch_lowp_out": rel(low, r)})
    return out


def plot(json_path: str, png_path: str, shape: str = "wan14b_720p") -> None:
    """Speedup over cuDNN dense vs kept density, forward and forward+backward (mask included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if r["shape"] == shape]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    dens = sorted({round(r["density"], 3) for r in rows})
    xs = [0.04 + i * 0.005 for i in range(int((max(dens) + 0.02 - 0.04) / 0.005))]
    for ax, key, title in ((axes[0], "speedup_fwd", "forward + mask build"),
                           (axes[1], "speedup_fwdbwd", "forward + backward + mask build")):
        ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal (1 / density)")
        for kernel, style in (("triton_q128", "o-"), ("triton_q64", "s-"), ("flex_q128", "^:"), ("flex_q64", "v:")):
            pts = sorted((r["density"], r[key]) for r in rows if r["kernel"] == kernel and r.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kernel.replace("_q", ", query block "))
        ax.axhline(8.0 if key == "speedup_fwd" else 7.5, color="tab:red", lw=0.8, alpha=0.6, label="issue-3 target")
        ax.set_xlabel("kept block density")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over cuDNN dense SDPA")
    axes[0].legend(fontsize=8)
    info = res["shapes"][shape]
    fig.suptitle(f"NABLA attention, {shape} (S={info['seq_len']}, {info['heads']} heads, D={res['head_dim']}), "
                 f"{res['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        plot(*args.plot)
        print(f"wrote {args.plot[1]}")
        return 0
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("nabla bench needs a CUDA GPU (timings of cuDNN, FlexAttention and the Triton kernel)", file=sys.stderr)
        return 2
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = 64  # never fall back to eager (S x S scores) mid-sweep
    from .backends.triton_kernel import _env_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter smoke run)"
    if device.type == "cpu":  # exercise every code path at a toy size (needs TRITON_INTERPRET=1)
        args.shapes, args.no_flex, args.head_dim, dtype, args.calls = "smoke", True, 32, torch.float32, 3
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    densities = [float(x) for x in args.densities.split(",")]
    if args.quick:
        shapes, densities = shapes[:1], [0.1]
    result: dict[str, Any] = {"card": card, "torch": torch.__version__, "python": platform.python_version(),
                              "dtype": args.dtype, "head_dim": args.head_dim, "inputs": __doc__.split("Inputs: ")[1].strip(),
                              "config": asdict(_env_config()), "shapes": {}, "rows": []}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"card: {card}, torch {torch.__version__}, dtype {args.dtype}, head_dim {args.head_dim}", flush=True)
    if args.check:
        result["check"] = _check_kernels(device, dtype, args.head_dim)
        for c in result["check"]:
            print("check", c, flush=True)

    rows: list[Row] = []
    chosen = _env_config()  # the library default unless NABLA_TRITON_CONFIG overrides it
    for shape in shapes:
        (T, Hh, W), text, heads = SHAPES[shape]
        layout = TokenLayout(VideoGrid(T, Hh, W), text)
        D = args.head_dim
        scale = 1.0 / math.sqrt(D)
        qt, kt, vt = structured_qkv(layout, heads, D, dtype, device)
        S = layout.seq_len
        info: dict[str, Any] = {"grid": [T, Hh, W], "text_tokens": text, "heads": heads, "seq_len": S,
                                "blocks": layout.num_blocks}
        dense_flops = 4.0 * heads * S * S * D
        qn, kn, vn = (untile(x, layout).contiguous() for x in (qt, kt, vt))
        info["cudnn_fwd_ms"] = time_ms(lambda: _dense_sdpa(qn, kn, vn))
        if not args.no_backward:
            qg, kg, vg = (x.clone().requires_grad_() for x in (qn, kn, vn))
            gdense = torch.randn_like(qn)

            def dense_step() -> None:
                for x in (qg, kg, vg):
                    x.grad = None
                _dense_sdpa(qg, kg, vg).backward(gdense)

            info["cudnn_fwdbwd_ms"] = time_ms(dense_step)
            del qg, kg, vg, gdense
        del qn, kn, vn
        info["cudnn_fwd_tflops"] = dense_flops / info["cudnn_fwd_ms"] / 1e9
        print(f"[{shape}] S={S} heads={heads}: cuDNN fwd {info['cudnn_fwd_ms']:.2f} ms "
              f"fwd+bwd {info.get('cudnn_fwdbwd_ms', float('nan')):.2f} ms", flush=True)

        gout = torch.randn_like(qt)
        if args.variants and "variants" not in result:
            chosen, var = sweep_variants(qt, kt, vt, layout, scale, gout)
            result["variants"] = {"shape": shape, "rows": var}
            result["config"] = asdict(chosen)
            print("  chosen config:", asdict(chosen), flush=True)
        kernels = [("triton", 128), ("triton", 64)]
        if not args.no_flex and (args.flex_all_shapes or shape == shapes[0]):
            kernels += [("flex", 128), ("flex", 64)]
        for dens in densities:
            masks = {qb: threshold_for_density(qt, kt, layout, dens, qb) for qb in (128, 64)}
            # Mask quality cost of 128-token query blocks: their kept density at the 64-block threshold.
            info.setdefault("qb128_density_at_qb64_threshold", {})[str(dens)] = fast_mask(
                qt, kt, layout, masks[64][0], 128).density
            for qb, (thr, m) in masks.items():
                # Mask build time and extra peak memory (fused builder, kv lists included).
                mask_ms = time_ms(lambda: fast_mask(qt, kt, layout, thr, qb))
                peak = peak_mib(lambda: fast_mask(qt, kt, layout, thr, qb))
                info.setdefault("masks", {})[f"{dens}_{qb}"] = {"threshold": thr, "density": m.density, "mask_ms": mask_ms,
                                                                "peak_mib": peak}
                if abs(dens - 0.1) < 1e-9:
                    info["masks"][f"{dens}_{qb}"]["natural_input"] = natural_input_mask_cost(qt, kt, layout, thr, qb)
                if abs(dens - 0.1) < 1e-9 and qb == 64 and "eager_mask_ms_qb64" not in info:
                    info["eager_mask_ms_qb64"] = time_ms(lambda: eager_mask(qt, kt, layout, thr, 64))
                    info["eager_mask_peak_mib"] = peak_mib(lambda: eager_mask(qt, kt, layout, thr, 64))
                    em = eager_mask(qt, kt, layout, thr, 64)
                    info["fast_mask_breakdown_qb64_ms"] = mask_breakdown(qt, kt, layout, thr)
                    fm = fast_mask(qt, kt, layout, thr, 64)
                    info["fast_vs_eager_differing_blocks"] = int((em.kept != fm.kept).sum())
                    info["fast_vs_eager_total_blocks"] = em.kept.numel()
                    del em, fm
            outs: dict[str, torch.Tensor] = {}
            for name, qb in kernels:
                thr, m = masks[qb]
                label = f"{name}_q{qb}"
                fn = _attn_fn(name, m, scale, chosen)
                try:
                    compile_s = first_call_s(lambda: fn(qt, kt, vt))
                    fwd_ms = time_ms(lambda: fn(qt, kt, vt))
                    if abs(dens - 0.1) < 1e-9:
                        outs[label] = fn(qt, kt, vt)
                    # End to end: the mask is rebuilt inside the timed region (new kv lists, new
                    # q-side lists in the backward), as in a real denoising step.
                    full_fwd = time_ms(lambda: _attn_fn(name, fast_mask(qt, kt, layout, thr, qb), scale, chosen)(qt, kt, vt))
                    fb = None
                    # FlexAttention's backward is not timed: with 64-token key blocks its autotuner hit an
                    # illegal memory access on torch 2.11 (H200), which poisons the CUDA context.
                    if not args.no_backward and name != "flex":
                        a, b, c = (x.clone().requires_grad_() for x in (qt, kt, vt))

                        def step() -> None:
                            for x in (a, b, c):
                                x.grad = None
                            mm = fast_mask(qt, kt, layout, thr, qb)
                            _attn_fn(name, mm, scale, chosen)(a, b, c).backward(gout)

                        try:
                            compile_s += first_call_s(step)
                            fb = time_ms(step)
                        except Exception as e:  # noqa: BLE001 - record and go on (e.g. flex bwd configs)
                            print(f"  {label} backward failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        del a, b, c
                except Exception as e:  # noqa: BLE001
                    print(f"  {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                work = m.density
                row = Row(shape, label, qb, work, thr, fwd_ms, info["masks"][f"{dens}_{qb}"]["mask_ms"], full_fwd, fb,
                          work * dense_flops / fwd_ms / 1e9, info["cudnn_fwd_ms"] / full_fwd,
                          (info["cudnn_fwdbwd_ms"] / fb) if fb else None,
                          work * info["cudnn_fwd_ms"] / fwd_ms, compile_s, info["masks"][f"{dens}_{qb}"]["peak_mib"])
                rows.append(row)
                print(f"  {label} d={work:.3f} fwd {fwd_ms:.2f} ms, +mask {full_fwd:.2f} ms "
                      f"({row.speedup_fwd:.2f}x), fwd+bwd+mask {fb if fb else float('nan'):.2f} ms "
                      f"({row.speedup_fwdbwd or float('nan'):.2f}x), first call {compile_s:.1f} s", flush=True)
            if outs:
                m128 = masks[128][1]
                errs = {}
                for qb in (128, 64):
                    sel = {n: o for n, o in outs.items() if n.endswith(f"q{qb}")}
                    if sel:
                        errs[qb] = masked_errors(qt, kt, vt, masks[qb][1], sel, scale)
                info["errors_at_10pct"] = {str(k): v for k, v in errs.items()}
                print("  errors vs float64 (max_abs, ratio to torch bf16 SDPA):",
                      {qb: {n: (round(e['max_abs'], 5), round(e.get('ratio_vs_torch', 1.0), 2)) for n, e in es.items()}
                       for qb, es in errs.items()}, flush=True)
                del outs, m128
        # Recompiles over calls with changing masks (threshold varies per call).
        if args.calls > 0:
            rc: dict[str, Any] = {}
            thr_list = [0.05 + 0.5 * i / max(1, args.calls - 1) for i in range(args.calls)]
            for name, qb in kernels:
                if name == "flex" and qb == 64:
                    continue
                g0, t0 = _recompiles(), _triton_variants()
                _sync()
                w0 = time.perf_counter()
                for thr in thr_list:
                    _attn_fn(name, fast_mask(qt, kt, layout, thr, qb), scale, chosen)(qt, kt, vt)
                _sync()
                rc[f"{name}_q{qb}"] = {"calls": len(thr_list), "dynamo_new_graphs": _recompiles() - g0,
                                       "triton_new_variants": _triton_variants() - t0,
                                       "wall_s": time.perf_counter() - w0}
            info["recompiles"] = rc
            print("  recompiles over changing masks:", rc, flush=True)
        result["shapes"][shape] = info
        result["rows"] = [asdict(r) for r in rows]
        if args.json:  # partial results survive a time-out
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        del qt, kt, vt, gout
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result["rows"] = [asdict(r) for r in rows]
    _print_table(result, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _print_table(result: dict[str, Any], rows: list[Row]) -> None:
    print(f"\nNABLA attention vs cuDNN dense SDPA on {result['card']} ({result['dtype']}, D={result['head_dim']})")
    hdr = (f"{'shape':14s} {'kernel':10s} {'dens':>5s} {'fwd ms':>7s} {'TFLOP/s':>7s} {'mask ms':>7s} "
           f"{'fwd+m':>7s} {'x cuDNN':>7s} {'f+b+m':>8s} {'x cuDNN':>7s} {'ideal':>5s} {'maskMiB':>7s} {'1st s':>5s}")
    print(hdr)
    for r in rows:
        fb = f"{r.fwdbwd_total_ms:8.1f}" if r.fwdbwd_total_ms else f"{'-':>8s}"
        sb = f"{r.speedup_fwdbwd:7.2f}" if r.speedup_fwdbwd else f"{'-':>7s}"
        print(f"{r.shape:14s} {r.kernel:10s} {r.density:5.3f} {r.fwd_ms:7.2f} {r.eff_tflops:7.0f} {r.mask_ms:7.2f} "
              f"{r.fwd_total_ms:7.2f} {r.speedup_fwd:7.2f} {fb} {sb} {r.frac_ideal:5.2f} {r.mask_peak_mib:7.0f} "
              f"{(r.compile_s or 0):5.1f}")
    for s, info in result["shapes"].items():
        print(f"{s}: cuDNN fwd {info['cudnn_fwd_ms']:.2f} ms ({info['cudnn_fwd_tflops']:.0f} TFLOP/s), "
              f"fwd+bwd {info.get('cudnn_fwdbwd_ms', float('nan')):.2f} ms; eager mask (qb64, 10%) "
              f"{info.get('eager_mask_ms_qb64', float('nan')):.2f} ms, peak {info.get('eager_mask_peak_mib', float('nan')):.0f} MiB")
        for key, m in info.get("masks", {}).items():
            nat = m.get("natural_input")
            if nat:
                fwd = next((r.fwd_ms for r in rows if r.shape == s and r.kernel == f"triton_q{key.split('_')[1]}"
                            and r.threshold == m["threshold"]), float("nan"))
                print(f"  mask on natural-order input ({key}): {nat['mask_cost_ms']:.2f} ms = pooled tiling "
                      f"{nat['tile_qk_pooled_ms']:.2f} - tiling {nat['tile_qk_ms']:.2f} + mask from the means "
                      f"{nat['mask_from_means_ms']:.2f} ({100 * nat['mask_cost_ms'] / fwd:.1f}% of the forward)")
