"""Kandinsky 5 Pro at 720p: NABLA through nabla-attn vs diffusers' own flex NABLA path, and cuDNN dense.

Shapes (issue 16): latent tokens 31 x 48 x 80 after patching = 119,040 tokens, 32 heads of 128
(model_dim 4096), bf16, random weights; the K5 Pro block's ff_dim 16384 and time_dim 1024 are
assumptions (no hub access when written). P = 0.7, STA window (11, 3, 3) on 64-token blocks: the
model's own ``attention_P`` / ``attention_w*`` mapped by ``NablaConfig.from_model``. Tokens are in
Kandinsky's fractal order (= our tiled order), as its pipeline runs them.

Timed, each the whole attention call with its mask (CUDA-event medians):

* ``nabla q64``: ``nabla_attention(..., token_order="tiled", query_block=64)`` (the paper's 64x64
  table; ``backend="auto"``), and ``nabla q128`` (two tiles per query block) beside it;
* ``diffusers flex``: ``nablaT_v2`` + ``dispatch_attention_fn(backend=FLEX)``, the code of
  ``Kandinsky5AttnProcessor`` after ``set_attention_backend("flex")``, under ``torch.compile`` (eager
  flex evaluates every score: dense work and an S x S matrix);
* ``cudnn dense``: SDPA with the cuDNN backend;
* the whole visual block (``Kandinsky5TransformerDecoderBlock``: self-attention, text
  cross-attention, FFN, modulation) with each: ``apply_nabla`` (blocks called directly after
  ``handle.set_grid``), ``set_attention_backend("flex")`` + ``torch.compile`` (how its docs compile,
  ``compile_repeated_blocks`` being ``torch.compile`` per block), and cuDNN dense; eager and compiled.

Inputs have structure, since random q, k give near-uniform block maps that trained video DiTs do
not produce: attention-only q, k are random Fourier features of each token's (t, h, w) position plus
noise (the idea of ``benchmarks/harness.py``'s ``structured_qkv``), so their dot products fall with
distance; the block's input is such features projected to model_dim, with the key projection tied to
the query projection so that q.k keeps the feature similarity. Both paths' kept densities and the
agreement of their tables are reported (diffusers pools and cumsums in bf16).

Predicted runtime on one H200 (not measured when written): ~25 s setup and inputs, ~60 s of Triton
JIT for our kernels at two query blocks, ~60-90 s compiling flex (attention, then the block), ~30 s
per other compiled block, ~20 s of timed calls: about 3.5 minutes; ``--eager-only`` drops the
compiled blocks other than flex's (about 2.5 minutes).

    PYTHONPATH=src python benchmarks/bench_kandinsky.py --out benchmarks/results/kandinsky_h200.json
    PYTHONPATH=src python benchmarks/bench_kandinsky.py --smoke     # tiny shapes on the CPU (~20 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nabla_attn import TokenLayout, VideoGrid, nabla_attention, nabla_mask, select_backend
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla

T0 = time.time()


@dataclass(frozen=True)
class Shape:
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    ff_dim: int
    time_dim: int
    text: int
    P: float = 0.7
    window: tuple[int, int, int] = (11, 3, 3)

    @property
    def grid(self) -> VideoGrid:
        return VideoGrid(self.frames, self.height, self.width)

    @property
    def model_dim(self) -> int:
        return self.heads * self.head_dim


PRO_720P = Shape(31, 48, 80, 32, 128, 16384, 1024, 256)
SMOKE = Shape(2, 16, 24, 2, 32, 128, 32, 8, window=(1, 1, 3))


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median milliseconds over ``reps`` calls after ``warmup`` (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ inputs
def fourier_features(grid: VideoGrid, width: int, ell: tuple[float, float, float], gen: torch.Generator,
                     device: torch.device) -> torch.Tensor:  # fmt: skip
    """``[S, width]`` features ``sqrt(2) cos(W x + b)`` of natural-order token positions: their dot
    products approximate ``width x`` a Gaussian kernel of the distance with length scales ``ell``."""
    n = torch.arange(grid.num_tokens, device=device)
    pos = torch.stack([n // (grid.height * grid.width), (n // grid.width) % grid.height, n % grid.width], 1).float()
    w = (torch.randn(width, 3, generator=gen) / torch.tensor(ell)).to(device)
    b = (torch.rand(width, generator=gen) * 2 * math.pi).to(device)
    return torch.cos(pos @ w.T + b) * math.sqrt(2.0)


def to_fractal(x: torch.Tensor, grid: VideoGrid) -> torch.Tensor:
    """Natural -> Kandinsky's fractal order along dim 1 (whole tiles: a pure permutation)."""
    return x.index_select(1, TokenLayout(grid).gather_index(x.device))


def structured_qkv(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[1, S, H, D]`` in fractal order, the memory layout Kandinsky's processor has."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # noise drawn on the device: 119k x 128 per head and tensor
    grid, S = shape.grid, shape.grid.num_tokens
    q = torch.empty(1, S, shape.heads, shape.head_dim, device=device, dtype=dtype)
    k = torch.empty_like(q)
    for h in range(shape.heads):  # narrow to broad length scales across heads
        feat = fourier_features(grid, shape.head_dim, (1.0 + 0.15 * h, 4.0 + 0.8 * h, 4.0 + 0.8 * h), gen, device)
        q[0, :, h] = (feat + 0.5 * torch.randn(feat.shape, device=device)).to(dtype)
        k[0, :, h] = (feat + 0.5 * torch.randn(feat.shape, device=device)).to(dtype)
    v = torch.randn(q.shape, device=device, dtype=dtype)
    return to_fractal(q, grid), to_fractal(k, grid), v


# --------------------------------------------------------------------------------------- attention
def attention_calls(shape: Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smoke: bool) -> dict[str, Callable]:
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

    g = shape.grid
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(g.frames, g.height // 8, g.width // 8, *shape.window, device=q.device)
    sta = sta[None, None]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views of [B, S, H, D] memory

    def diffusers_flex() -> torch.Tensor:  # Kandinsky5AttnProcessor's two calls after set_attention_backend("flex")
        mask = nablaT_v2(q, k, sta, thr=shape.P)
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=AttentionBackendName.FLEX)

    def nabla(query_block: int) -> Callable[[], torch.Tensor]:
        return lambda: nabla_attention(qh, kh, vh, g, shape.P, shape.window, token_order="tiled",
                                       query_block=query_block)  # fmt: skip

    def dense() -> torch.Tensor:
        with contextlib.nullcontext() if smoke else sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    # CPU inductor cannot compile flex with Kandinsky's BlockMask: the smoke run checks the call eagerly.
    return {"nabla q64": nabla(64), "nabla q128": nabla(128), "cudnn dense": dense,
            "diffusers flex": diffusers_flex if smoke else torch.compile(diffusers_flex)}  # fmt: skip


def table_agreement(shape: Shape, q: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    """Kept density of our float32 table and of diffusers' bf16 one on the same q, k, and the fraction
    of block pairs on which they agree (STA included in both)."""
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

    g = shape.grid
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(g.frames, g.height // 8, g.width // 8, *shape.window, device=q.device)
    theirs = nablaT_v2(q, k, sta[None, None], thr=shape.P).to_dense().bool()
    ours = nabla_mask(q.transpose(1, 2), k.transpose(1, 2), g, shape.P, shape.window, token_order="tiled").dense()
    return {"density_nabla": float(ours.float().mean()), "density_diffusers": float(theirs.float().mean()),
            "agreement": float((ours == theirs).float().mean())}  # fmt: skip


# ------------------------------------------------------------------------------------------- block
@dataclass
class BlockRig:
    model: torch.nn.Module
    block: torch.nn.Module
    args: tuple
    fractal_params: dict[str, Any]
    nabla_density: float | None = None  # kept fraction NABLA's table had inside the block


def block_rig(shape: Shape, dtype: torch.dtype, device: torch.device) -> BlockRig:
    """A one-visual-block Kandinsky 5 Pro-width model (random weights, bf16, modulation in float32 as
    its ``_keep_in_fp32_modules`` says) and the block's inputs in fractal order."""
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.models.transformers.transformer_kandinsky import fractal_flatten
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

    torch.manual_seed(0)
    axes = (shape.head_dim // 4, 3 * shape.head_dim // 8, 3 * shape.head_dim // 8)  # Pro: (32, 48, 48)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=64, in_text_dim2=64, time_dim=shape.time_dim, out_visual_dim=16,
        model_dim=shape.model_dim, ff_dim=shape.ff_dim, num_text_blocks=0, num_visual_blocks=1, axes_dims=axes,
        attention_type="nabla", attention_P=shape.P, attention_wT=shape.window[0], attention_wH=shape.window[1],
        attention_wW=shape.window[2], attention_add_sta=True, attention_method="topcdf",
    ).to(device)  # fmt: skip
    block = model.visual_transformer_blocks[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm gains stay 1: random ~0.02 gains shrink every score to ~0
                continue
            # Zero-initialised modulation would switch attention off; small random shifts and scales keep
            # the features' distance structure (large ones make every token alike: uniform block maps).
            p.normal_(0, 0.02 if "modulation" not in name else 0.002)
        attn = block.self_attention  # tie keys to queries: q.k keeps the features' distance structure
        attn.to_key.weight.copy_(attn.to_query.weight)
        attn.to_key.bias.copy_(attn.to_query.bias)
    model.to(dtype)
    for name, module in model.named_modules():
        if name.endswith("modulation") or name == "time_embeddings":
            module.float()
    g, gen = shape.grid, torch.Generator().manual_seed(1)
    x = fourier_features(g, shape.model_dim, (1.0, 4.0, 4.0), gen, device)
    visual = (x + 0.5 * torch.randn(x.shape, device=device)).to(dtype).view(1, g.frames, g.height, g.width, -1)
    visual_shape = (1, g.frames, g.height, g.width)
    pos = [torch.arange(n, device=device) for n in visual_shape[1:]]
    rope = model.visual_rope_embeddings(visual_shape, pos)
    visual, rope = fractal_flatten(visual, rope, visual_shape, block_mask=True)
    # RoPE of random features scrambles what block means see (trained q, k are built for it, random
    # ones are not), which left the block's tables near dense: identity rotations keep the same work.
    text = torch.randn(1, shape.text, shape.model_dim, generator=gen).to(device, dtype)
    time_embed = torch.randn(1, shape.time_dim, generator=gen).to(device)
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(g.frames, g.height // 8, g.width // 8, *shape.window, device=device)
    params = {"sta_mask": sta[None, None], "to_fractal": True, "P": shape.P}
    return BlockRig(model, block, (visual, text, time_embed, rope), params)


@contextlib.contextmanager
def block_mode(rig: BlockRig, mode: str, shape: Shape, smoke: bool) -> Iterator[Callable[[], torch.Tensor]]:
    """The block as ``mode`` runs it: "nabla" (apply_nabla), "flex" (diffusers' own), "cudnn" (dense)."""
    if mode == "nabla":
        handle = apply_nabla(rig.model, NablaConfig.from_model(rig.model))
        handle.set_grid(shape.grid)  # blocks called directly skip the transformer's grid hook
        try:
            yield lambda: rig.block(*rig.args, rig.fractal_params)
        finally:
            rig.nabla_density = handle.stats().overall
            remove_nabla(handle)
    elif mode == "flex":
        rig.model.set_attention_backend("flex")
        try:
            yield lambda: rig.block(*rig.args, rig.fractal_params)
        finally:
            rig.model.reset_attention_backend()
    else:
        def dense() -> torch.Tensor:
            with contextlib.nullcontext() if smoke else sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return rig.block(*rig.args, None)

        yield dense


def block_times(rig: BlockRig, shape: Shape, smoke: bool, eager_only: bool, reps: int) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, float]] = {"eager": {}, "compiled": {}}
    for mode in ("cudnn", "nabla", "flex"):
        with block_mode(rig, mode, shape, smoke) as call, torch.no_grad():
            if mode != "flex":  # eager flex computes every score (dense work, an S x S matrix)
                times["eager"][mode] = time_ms(call, reps)
                log(f"block eager {mode}: {times['eager'][mode]:.1f} ms")
            if (mode == "flex" or not eager_only) and not smoke:
                torch._dynamo.reset()
                compiled = torch.compile(call)
                t = time.time()
                compiled()
                log(f"block compile {mode}: {time.time() - t:.1f} s")
                times["compiled"][mode] = time_ms(compiled, reps)
                log(f"block compiled {mode}: {times['compiled'][mode]:.1f} ms")
    return times


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks that every path runs")
    ap.add_argument("--eager-only", action="store_true", help="skip compiling the nabla and cudnn blocks")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON results path")
    args = ap.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    shape, device = (SMOKE, torch.device("cpu")) if smoke else (PRO_720P, torch.device("cuda"))
    dtype = torch.bfloat16
    reps = 1 if smoke else args.reps
    log(f"shape {asdict(shape)} on {device}{' (smoke)' if smoke else ''}")

    q, k, v = structured_qkv(shape, dtype, device)
    agreement = table_agreement(shape, q, k)
    log(f"tables: {agreement}")
    attention: dict[str, float] = {}
    first_call_s: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in attention_calls(shape, q, k, v, smoke).items():
            t = time.time()
            fn()
            first_call_s[name] = time.time() - t
            attention[name] = time_ms(fn, reps)
            log(f"attention {name}: {attention[name]:.2f} ms (first call {first_call_s[name]:.1f} s)")
    backend = select_backend(q.transpose(1, 2), query_block=64)
    del q, k, v
    rig = block_rig(shape, dtype, device)
    blocks = block_times(rig, shape, smoke, args.eager_only, reps)

    flex = attention["diffusers flex"]
    result = {
        "shape": asdict(shape), "tokens": shape.grid.num_tokens, "dtype": str(dtype), "smoke": smoke,
        "nabla_backend": backend, "attention_ms": attention, "first_call_s": first_call_s, "tables": agreement,
        "block_ms": blocks, "block_nabla_density": rig.nabla_density,
        "speedup_vs_diffusers_flex": {n: flex / t for n, t in attention.items()},
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()},
        "wall_s": time.time() - T0,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.out}")

    print(f"\nKandinsky 5 Pro block, {shape.grid.num_tokens} tokens, {shape.heads}x{shape.head_dim}, P={shape.P}, "
          f"STA {shape.window}; kept: nabla {agreement['density_nabla']:.3f}, diffusers {agreement['density_diffusers']:.3f}")
    print(f"{'attention call (mask included)':34s} {'ms':>9s} {'vs flex':>8s}")
    for name, t in attention.items():
        print(f"{name:34s} {t:9.2f} {flex / t:7.2f}x")
    for how, row in blocks.items():
        for mode, t in row.items():
            print(f"{'block ' + how + ' ' + mode:34s} {t:9.2f}")
    print(f"kept fraction of NABLA's table inside the block: {rig.nabla_density}")


if __name__ == "__main__":
    main()
