"""Benchmark machinery shared by the scripts in ``benchmarks/`` (formerly ``nabla_attn.bench``).

- timing: CUDA-event medians within a time budget (:func:`time_ms`), fixed repetitions
  (:func:`time_fixed`), first-call seconds, peak device memory, training steps to time
  (:func:`grad_step`), the GPU kernels of one call (:func:`profile_kernels`);
- inputs: structured q, k (random Fourier features of token positions, :func:`structured_qkv`) and
  the threshold that lands a mask at a kept density (:func:`threshold_for_density`);
- correctness: float64 errors of sampled query rows under the flash-attention rule
  (:func:`masked_errors`, :func:`flash_rule_failures`), fused vs eager mask tables;
- mask cost: stage times of the fused builder, the mask's cost on natural-order input;
- recompiles: new dynamo graphs and new Triton specialisations of our kernels;
- the speedup plot of ``bench_attention.py``.

Only public ``nabla_attn`` names are used, so the scripts follow the library's seams.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from typing import Any, Callable

import torch

from nabla_attn import BLOCK_TOKENS, BlockSparseMask, MaskSpec, TokenLayout, nabla_mask_tiled

# Feature amplitude: block-level logits of ~5-15, densities 1-80% for thresholds 0.7-0.999.
AMP = 1.0
SHAPES: dict[str, tuple[tuple[int, int, int], int, int]] = {
    # name: ((frames, height, width) latent grid, text tokens, heads)
    "wan14b_720p": ((21, 40, 80), 0, 40),
    "wan1.3b_480p": ((21, 30, 52), 0, 12),
    "hunyuan_720p": ((33, 45, 80), 256, 24),
    "smoke": ((2, 9, 10), 3, 1),
}
# CPU calls per measurement: smoke runs only check that the code runs.
CPU_REPS = 1


# ------------------------------------------------------------------------------------------ timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], budget_ms: float = 400.0, max_reps: int = 30) -> float:
    """Median milliseconds of ``fn`` after one warm-up call: as many repetitions as fit in
    ``budget_ms`` (at least 3, at most ``max_reps``; the first sets the count), CUDA events on the
    GPU. Each repetition starts on an idle GPU, so launch overheads count as a caller meets them."""
    if not torch.cuda.is_available():
        return time_fixed(fn, CPU_REPS, 0)
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[float] = []
    reps = 1
    while len(times) < reps:
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if len(times) == 1:
            reps = int(min(max_reps, max(3, budget_ms / max(times[0], 1e-3))))
    return statistics.median(times)


def time_fixed(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after ``warmup`` calls (each call timed on
    its own, so one slow repetition moves the median, not the result)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    stops = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for a, b in zip(starts, stops):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, stops))


def alternating_rounds(fns: dict[str, Callable[[], Any]], rounds: int, budget_ms: float) -> dict[str, list[float]]:
    """:func:`time_ms` of each variant once per round, in the given order on even rounds and reversed
    on odd ones, so drift within a call (clocks, L2) hits every variant alike; one time per round."""
    ms: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        for n in list(fns) if r % 2 == 0 else list(reversed(fns)):
            ms[n].append(time_ms(fns[n], budget_ms=budget_ms))
    return ms


def first_call_s(fn: Callable[[], Any]) -> float:
    """Seconds of one call, synchronised (the JIT compile of a new kernel specialisation included)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak device memory ``fn`` allocates beyond what was allocated before (MiB; NaN on the CPU)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def grad_step(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    """A training step to time: ``fn(*leaves)`` forward, then backward against ``grad`` (fresh grads)."""
    def step() -> None:
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(grad)
    return step


def profile_kernels(fn: Callable[[], Any], top: int = 14) -> list[dict[str, Any]]:
    """GPU kernels of one call of ``fn`` by self device time (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    us = [(e, getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
          for e in prof.key_averages()]
    rows = [{"kernel": e.key[:90], "calls": e.count, "ms": t / 1e3} for e, t in us if t > 0]
    rows.sort(key=lambda r: -r["ms"])
    return [{"kernel": "(all kernels)", "calls": sum(r["calls"] for r in rows), "ms": sum(r["ms"] for r in rows)}] + rows[:top]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention as the baselines time it: cuDNN's SDPA on CUDA (PyTorch's math path on CPU,
    for smoke runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


# ------------------------------------------------------------------------------------------ inputs
def structured_qkv(layout: TokenLayout, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Natural-order contiguous ``[1, H, seq_len, D]`` q, k, v with local attention structure.

    Random q and k give nearly uniform block maps, which trained video DiTs do not produce. Here q
    and k of each video token are random Fourier features of its (t, h, w) position,
    ``sqrt(2) cos(W x + b)``, whose dot products approximate a Gaussian kernel of token distance;
    each head has its own length scales (narrow to broad) and noise is added. Text tokens and v are
    Gaussian. The construction of the pre-refactor ``nabla bench``, so numbers stay comparable.
    """
    g = layout.grid
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nat = torch.arange(g.num_tokens, device=device)
    pos = torch.stack([nat // (g.height * g.width), (nat // g.width) % g.height, nat % g.width], 1).float()
    shape = (1, heads, layout.seq_len, head_dim)
    q = torch.empty(shape, dtype=dtype, device=device)
    k = torch.empty(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    text = layout.text_tokens
    vid = slice(0, g.num_tokens) if layout.text_position == "end" else slice(text, text + g.num_tokens)
    tx = slice(g.num_tokens, None) if layout.text_position == "end" else slice(0, text)
    for h in range(heads):
        ell = torch.tensor([1.0 + 0.15 * h, 4.0 + 0.8 * h, 4.0 + 0.8 * h])
        w = (torch.randn(head_dim, 3, generator=gen) / ell).to(device)
        b = (torch.rand(head_dim, generator=gen) * 2 * math.pi).to(device)
        feat = torch.cos(pos @ w.T + b) * math.sqrt(2.0)  # E[feat(x).feat(y)] ~ D * kernel(x - y)
        q[0, h, vid] = (AMP * feat + 0.5 * torch.randn(feat.shape, device=device)).to(dtype)
        k[0, h, vid] = (AMP * feat + 0.5 * torch.randn(feat.shape, device=device)).to(dtype)
        if text:
            q[0, h, tx] = torch.randn(text, head_dim, device=device).to(dtype)
            k[0, h, tx] = torch.randn(text, head_dim, device=device).to(dtype)
    return q, k, v


def bshd(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied into ``[B, S, H, D]`` memory and viewed as ``[B, H, S, D]``: how diffusers'
    attention processors hand q, k, v over."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def threshold_for_density(qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, density: float, query_block: int,
                          backend: str = "auto", iters: int = 16) -> tuple[float, BlockSparseMask]:
    """The threshold whose mask (on tiled q, k) keeps the fraction of the block table closest to
    ``density``, by bisection on ``log(1 - threshold)`` (density falls as the dropped mass grows)."""
    lo, hi = math.log(1e-7), math.log(0.9999)
    best: tuple[float, BlockSparseMask] | None = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        thr = 1.0 - math.exp(mid)
        m = nabla_mask_tiled(qt, kt, layout, thr, None, query_block=query_block, backend=backend)  # type: ignore[arg-type]
        d = m.density
        if best is None or abs(d - density) < abs(best[1].density - density):
            best = (thr, m)
        lo, hi = (mid, hi) if d > density else (lo, mid)
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------ errors
def natural_blocks(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """The 64-token block of each natural-order token (int64 ``[seq_len]``)."""
    return layout.scatter_index(device) // BLOCK_TOKENS


@torch.enable_grad()
def masked_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                  outs: dict[str, torch.Tensor], scale: float, *, gout: torch.Tensor | None = None,
                  dqs: dict[str, torch.Tensor] | None = None, heads: int = 2, rows: int = 2048,
                  seed: int = 1) -> dict[str, dict[str, float]]:
    """Errors of natural-order outputs ``outs`` (and, with ``gout``, of gradients ``dqs`` of q)
    against float64 on sampled query rows of the masked problem, with PyTorch's own SDPA in the
    inputs' dtype on the same rows and mask as ``torch_sdpa_lowp`` (the flash-attention rule's yardstick).

    A query row's output and its dq depend on that row alone, so both are exact on a sample."""
    layout = mask.layout
    blk = natural_blocks(layout, q.device)
    gen = torch.Generator().manual_seed(seed)
    pick_all = torch.randperm(layout.seq_len, generator=gen)[:rows].sort().values.to(q.device)
    group = mask.query_block // BLOCK_TOKENS
    dqs = dqs or {}
    acc: dict[str, list[tuple[float, float, float]]] = {}
    for h in range(min(heads, q.shape[1])):
        kept = mask.kept[0, 0 if mask.kept.shape[1] == 1 else h]
        allowed = kept[blk[pick_all] // group][:, blk]
        has = allowed.any(1)
        pick, allowed = pick_all[has], allowed[has]
        qs = q[0, h, pick].detach().double().requires_grad_(gout is not None)
        s = (qs @ k[0, h].double().T * scale).masked_fill(~allowed, float("-inf"))
        ref = torch.softmax(s, -1) @ v[0, h].double()
        kl, vl = k[0, h][None, None].detach(), v[0, h][None, None].detach()

        def low_sdpa(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(x[None, None], kl, vl, attn_mask=allowed[None, None],
                                                                    scale=scale)[0, 0]

        with torch.no_grad():  # the forward yardstick as before, whatever kernel a backward would need
            cands = {n: o[0, h, pick] for n, o in outs.items()}
            cands["torch_sdpa_lowp"] = low_sdpa(q[0, h, pick])
        if gout is not None:
            g = gout[0, h, pick]
            ref_dq = torch.autograd.grad(ref, qs, g.double())[0]
            ql = q[0, h, pick].detach().clone().requires_grad_()
            cands["torch_sdpa_lowp:dq"] = torch.autograd.grad(low_sdpa(ql), ql, g)[0]
            cands.update({f"{n}:dq": d[0, h, pick] for n, d in dqs.items()})
        for n, o in cands.items():
            r = (ref_dq if n.endswith(":dq") else ref).detach()
            d = o.detach().double() - r
            acc.setdefault(n, []).append((float(d.abs().max()), float(d.norm()), float(r.norm())))
        del s, ref, cands
    out: dict[str, dict[str, float]] = {}
    for n, vals in acc.items():
        base, what = (n[:-3], "dq_") if n.endswith(":dq") else (n, "")
        e = out.setdefault(base, {})
        e[f"{what}max_abs"] = max(x[0] for x in vals)
        e[f"{what}rel"] = math.sqrt(sum(x[1] ** 2 for x in vals)) / max(1e-30, math.sqrt(sum(x[2] ** 2 for x in vals)))
    yard = out["torch_sdpa_lowp"]
    for e in out.values():
        for what in ("", "dq_"):
            if f"{what}max_abs" in e and yard.get(f"{what}max_abs"):
                e[f"{what}ratio_vs_torch"] = e[f"{what}max_abs"] / yard[f"{what}max_abs"]
    return out


def flash_rule_failures(errors: dict[str, dict[str, float]], label: str, factor: float = 2.0,
                        floor: float = 0.0, keys: tuple[str, ...] = ("",)) -> list[str]:
    """The flash-attention rule: each kernel's max error <= ``factor`` x PyTorch's own low-precision
    SDPA error on the same masked problem (errors below ``floor`` pass: float32 smoke runs)."""
    yard = errors["torch_sdpa_lowp"]
    bad = []
    for n, e in errors.items():
        for what in keys:
            got, ref = e.get(f"{what}max_abs"), yard.get(f"{what}max_abs")
            if n != "torch_sdpa_lowp" and got is not None and ref is not None and got > max(factor * ref, floor):
                bad.append(f"{label} {n} {what or 'out_'}max_abs {got:.3g} > {factor} x torch {ref:.3g}")
    return bad


# -------------------------------------------------------------------------------------------- mask
def table_from_scores(scores: torch.Tensor, layout: TokenLayout, spec: MaskSpec, *, write_lists: bool = True,
                      row_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused row kernel on precomputed float32 block scores: ``(kept, counts, indices)``."""
    from nabla_attn.kernels.mask_build import nabla_table

    g = layout.grid
    return nabla_table(scores, device=scores.device, num_video_blocks=layout.num_video_blocks,
                       num_blocks=layout.num_blocks, tile_rows=g.tile_rows, tile_cols=g.tile_cols, cut=spec.cut,
                       window=spec.half_window, group=spec.group, write_lists=write_lists, row_warps=row_warps)


def mask_stage_times(be: Any, qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout,
                     spec: MaskSpec) -> dict[str, float]:
    """The fused builder's stages on pre-tiled q, k: pooling both (one pass), the score product, the
    row kernel with its kv lists, and the whole build through the backend."""
    from nabla_attn.kernels.mask_build import block_scores, pool_pair

    nv, counts = layout.num_video_blocks, layout.block_counts(qt.device)
    qa, ka = pool_pair(qt, kt, counts, nv)
    scores = block_scores(qa, ka)
    out = {"pool_q_and_k_ms": time_ms(lambda: pool_pair(qt, kt, counts, nv)),
           "scores_ms": time_ms(lambda: block_scores(qa, ka)),
           "rows_and_lists_ms": time_ms(lambda: table_from_scores(scores, layout, spec)),
           "total_ms": time_ms(lambda: be.build_mask(qt, kt, layout, spec))}
    return out


def natural_mask_cost(be: Any, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout,
                      spec: MaskSpec) -> dict[str, float]:
    """What the mask adds to a call on natural-order q, k, which the op tiles anyway: its tiling pass
    also writes the block means, so the mask costs the pooled tiling minus plain tiling plus the mask
    from those means. Empty where the backend's tiling writes no means (the eager gather)."""
    qa, ka = be.tile(q, layout, pool=True)[1], be.tile(k, layout, pool=True)[1]
    if qa is None or ka is None:
        return {}
    out = {"tile_qk_ms": time_ms(lambda: (be.tile(q, layout), be.tile(k, layout))),
           "tile_qk_pooled_ms": time_ms(lambda: (be.tile(q, layout, pool=True), be.tile(k, layout, pool=True))),
           "mask_from_means_ms": time_ms(lambda: be.mask_from_means(qa, ka, layout, spec)),
           "mask_from_means_peak_mib": peak_mib(lambda: be.mask_from_means(qa, ka, layout, spec))}
    out["mask_cost_ms"] = out["tile_qk_pooled_ms"] - out["tile_qk_ms"] + out["mask_from_means_ms"]
    return out


# -------------------------------------------------------------------------------------- recompiles
_COMPILES: dict[str, int] = {}


def install_compile_counter() -> None:
    """Count new Triton specialisations of our kernels from now on (Triton's post-compile hook; the
    interpreter compiles nothing, so smoke runs count 0)."""
    try:
        from triton import knobs
    except ImportError:
        return
    previous = knobs.runtime.jit_post_compile_hook
    if getattr(previous, "nabla_bench", False):
        return

    def hook(*args: Any, **kwargs: Any) -> Any:
        info = kwargs.get("fn")
        name = f"{getattr(info, 'module', '')}.{getattr(info, 'name', '')}"
        if name.startswith("nabla_attn."):
            _COMPILES[name] = _COMPILES.get(name, 0) + 1
        return previous(*args, **kwargs) if previous else None

    hook.nabla_bench = True  # type: ignore[attr-defined]
    knobs.runtime.jit_post_compile_hook = hook


def triton_compiles() -> int:
    """Specialisations of ``nabla_attn`` Triton/Gluon kernels compiled since the counter was installed."""
    return sum(_COMPILES.values())


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (-1 if the counter moved)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a torch-internal counter
        return -1


# -------------------------------------------------------------------------------------------- plot
def plot(json_path: str, png_path: str, shape: str | None = None) -> None:
    """Speedup over cuDNN dense vs kept density from a ``bench_attention.py`` JSON: the public op on
    natural-order input (solid) and the kernel alone (dashed), both query blocks, forward and
    forward + backward, log scale, with the ideal ``1 / density``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        res = json.load(f)
    shape = shape or next(iter(res["shapes"]))
    rows = [r for r in res["rows"] if r["shape"] == shape]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    dens = [r["density"] for r in rows] or [0.05, 0.3]
    xs = [min(dens) * 0.8 + i * (max(dens) * 1.1 - min(dens) * 0.8) / 50 for i in range(51)]
    for ax, kind, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        ax.plot(xs, [1 / x for x in xs], "k:", lw=1, label="ideal (1 / density)")
        for qb, color in ((128, "tab:blue"), (64, "tab:orange")):
            for col, style, what in (("op", "o-", "nabla_attention, natural order"), ("kernel", "s--", "kernel alone")):
                pts = sorted((r["density"], r[f"{col}_{kind}_x"]) for r in rows
                             if r["query_block"] == qb and r.get(f"{col}_{kind}_x"))
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{what}, query block {qb}")
        ax.set_xlabel("kept block density")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("speedup over cuDNN dense SDPA")
    axes[0].legend(fontsize=7)
    info = res["shapes"][shape]
    fig.suptitle(f"NABLA attention, {shape} (S={info['seq_len']}, {info['heads']} heads, D={res['head_dim']}), "
                 f"{res['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
