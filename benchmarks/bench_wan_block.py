"""One diffusers Wan 2.1 14B transformer block at 720p: dense vs NABLA, against a measured bound.

A real ``WanTransformer3DModel`` with the 14B config (dim 5120, 40 heads of 128, FFN 13824, random
bf16 weights with Wan's fp32 norms/modulation), block 1, text context 512 tokens, latent grid
21 x 45 x 80 (1280x720, 81 frames). NABLA goes in through ``apply_nabla`` as users call it
(``backend="auto"``, per-layer tiling), threshold calibrated on the block's own q, k to
``--target-density``. One call, CUDA-event medians (``harness.time_fixed``):

* attention alone on the block's q, k, v in the ``[B, S, H, D]`` memory the processor hands over:
  cuDNN SDPA, FlashAttention-2 SDPA, the NABLA op and its parts (tiling with block means, mask from
  the means, the kernel writing natural order; with fp8 the kernel and untiling);
* the block, eager: dense cuDNN, dense FA2, NABLA, and the block without self-attention;
* the training step (forward + backward of the block against a fixed output gradient), with and
  without ``torch.utils.checkpoint`` around the block: dense cuDNN, NABLA, no attention;
* the block under ``torch.compile``: dense cuDNN, no attention, NABLA (no recompile on a new mask).

**The bound.** A NABLA block is the block's non-attention work plus the NABLA op; at kept density
``d`` the best sparse attention costs ``d x`` the dense cuDNN attention of the same q, k, v. So

    bound = T(block without self-attention) + d x T(cuDNN attention),   share = bound / T(NABLA block)

The first term is *measured*: attn1 runs a processor with the same code around the attention call
as NABLA's (projections, norms, RoPE, output projection) whose attention is an opaque op returning
an uninitialised tensor (zero cost; opaque so ``torch.compile`` cannot drop the q, k projections
it feeds). The pre-refactor bound derived it as dense block minus attention alone: a small
difference of two large measurements, which carried the noise of both, and under ``torch.compile``
lost the fusions inductor makes around attention in the dense block but not in the NABLA one, so the
share could pass 100 %. Now the NABLA block and the no-attention block run the same non-attention
ops in the same mode, each measured directly, so the share exceeds 100 % only if NABLA's attention
beats ``d x`` cuDNN per kept block pair (a real result, e.g. on a padded grid) or by the noise of
one block time, not of a subtraction. Training: ``d x`` the cuDNN forward + backward, plus ``d x`` one more
forward with checkpointing (it recomputes the forward).

    PYTHONPATH=src python benchmarks/bench_wan_block.py --out wan_block.json
    PYTHONPATH=src python benchmarks/bench_wan_block.py --smoke        # tiny config on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import harness as H
from nabla_attn import MaskSpec, TokenLayout, VideoGrid, backends, nabla_attention, select_backend, tile, untile
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


@torch.library.custom_op("nabla_bench::no_attention", mutates_args=())
def no_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention that costs nothing: an uninitialised tensor shaped (and strided) like v."""
    return torch.empty_like(v)


@no_attention.register_fake
def _(q, k, v):  # type: ignore[no-untyped-def]
    return torch.empty_like(v)


def _no_attention_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)  # attention keeps q, k, v for its backward too


def _no_attention_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(x) for x in ctx.saved_tensors)


no_attention.register_autograd(_no_attention_backward, setup_context=_no_attention_setup)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on ``[B, S, H, D]``, written into an x-dtype result as diffusers does."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def project(attn: torch.nn.Module, x: torch.Tensor, rotary: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn1's q, k, v as Wan's processors make them: ``[B, H, S, D]`` views of ``[B, S, H, D]`` memory."""
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    q, k, v = _get_qkv_projections(attn, x, None)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    v = v.unflatten(2, (attn.heads, -1))
    if rotary is not None:
        q, k = rope(q, *rotary), rope(k, *rotary)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class NoAttentionProcessor:
    """attn1 with everything but attention: the code around NABLA's op call in its Wan processor."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, rotary_emb: Any = None) -> torch.Tensor:
        q, k, v = project(attn, hidden_states, rotary_emb)
        out = no_attention(q, k, v).transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def sdpa_ctx(kind: str, device: str) -> Any:
    if device != "cuda":
        return sdpa_kernel(SDPBackend.MATH)
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kind])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=45)
    ap.add_argument("--width", type=int, default=80)
    ap.add_argument("--target-density", type=float, default=0.1, help="threshold calibrated to this kept density")
    ap.add_argument("--threshold", type=float, default=None, help="use this threshold instead of calibrating")
    ap.add_argument("--query-block", type=int, default=128)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8"),
                    help="NABLA's precision (fp8: forward only, so no training step)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="start the training step before 0.5 x budget s, each compiled block before budget s")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke: aot_eager)")
    ap.add_argument("--forward-tiling", action="store_true", help="also time NABLA with tiling='forward'")
    ap.add_argument("--profile", action="store_true", help="GPU kernels of one dense and one NABLA eager block")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU, to check the script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.frames, args.height, args.width, args.reps, args.train_reps = 3, 10, 18, 2, 1
        args.compile_backend = "aot_eager"
    return args


@dataclass
class Setup:
    """The model, its block 1 and the block's inputs; :meth:`attention` swaps attn1's attention."""

    model: Any
    block: Any
    grid: VideoGrid
    inputs: tuple[Any, ...]  # hidden states, text context, timestep embedding, RoPE tables
    threshold: float = 0.0
    query_block: int = 128
    precision: str = "bf16"

    def run(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        h, context, temb, rotary = self.inputs
        return self.block(h if hidden is None else hidden, context, temb, rotary)

    @contextlib.contextmanager
    def attention(self, kind: str, threshold: float | None = None) -> Iterator[Any]:
        """``dense`` (diffusers' processor), ``none`` (:class:`NoAttentionProcessor`) or ``nabla``
        (``apply_nabla`` with per-layer tiling; ``threshold`` defaults to the calibrated one)."""
        original, handle = self.block.attn1.processor, None
        if kind == "none":
            self.block.attn1.set_processor(NoAttentionProcessor())
        elif kind == "nabla":
            cfg = NablaConfig(threshold=self.threshold if threshold is None else threshold,
                              query_block=self.query_block, tiling="layer", precision=self.precision)  # type: ignore[arg-type]
            handle = apply_nabla(self.model, cfg)
            handle.set_grid(self.grid)
        try:
            yield handle
        finally:
            if handle is not None:
                remove_nabla(handle)
            self.block.attn1.set_processor(original)


def build(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Setup:
    from diffusers import WanTransformer3DModel

    heads, head_dim, ffn, text_len, text_dim = (2, 64, 256, 16, 32) if args.smoke else (40, 128, 13824, 512, 4096)
    grid = VideoGrid(args.frames, args.height, args.width)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
            out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        )  # fmt: skip
    latents = torch.empty(1, 16, grid.frames, 2 * grid.height, 2 * grid.width, device=device)
    rotary = tuple(t.float() for t in model.rope(latents))  # Wan keeps RoPE in fp32, as from_pretrained does
    model = model.to(dtype)
    for name in WanTransformer3DModel._keep_in_fp32_modules:
        for mod_name, mod in model.named_modules():
            if mod_name.split(".")[-1] == name:
                mod.float()
    model.requires_grad_(False).eval()
    block = model.blocks[1]  # a middle block
    block.scale_shift_table.data = block.scale_shift_table.data.float()
    dim = heads * head_dim
    hidden = torch.randn(1, grid.num_tokens, dim, device=device, dtype=dtype)
    context = torch.randn(1, text_len, dim, device=device, dtype=dtype)
    temb = torch.randn(1, 6, dim, device=device, dtype=dtype) * 0.1
    return Setup(model, block, grid, (hidden, context, temb, rotary), query_block=args.query_block,
                 precision=args.precision)


def attention_alone(st: Setup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: Callable[..., float],
                    res: dict[str, Any], device: str) -> None:
    """Dense SDPA and the NABLA op on the block's q, k, v, and the op's parts through its backend."""
    ms, grid, layout, thr, qb = res["ms"], st.grid, TokenLayout(st.grid), st.threshold, st.query_block
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for kind in ("cudnn", "flash") if device == "cuda" else ("cudnn",):
        with sdpa_ctx(kind, device):
            ms[f"attn_dense_{kind}"] = t(lambda: sdpa(q, k, v))
    be, spec, scale = backends.get(res["backend"]), MaskSpec(thr, None, qb), 1.0 / math.sqrt(q.shape[-1])
    op = lambda: nabla_attention(q, k, v, grid, thr, query_block=qb, precision=st.precision)  # type: ignore[arg-type]  # noqa: E731
    res["first_op_call_s"] = H.first_call_s(op)
    ms["attn_nabla_op"] = t(op)
    (qt, qa), (kt, ka), (vt, _) = be.tile(q, layout, pool=True), be.tile(k, layout, pool=True), be.tile(v, layout)
    ms["nabla_tile_qkv"] = t(lambda: (be.tile(q, layout, pool=True), be.tile(k, layout, pool=True), be.tile(v, layout)))
    if qa is not None and ka is not None:  # what the op does: the mask from the means tiling wrote
        mask, plan = be.mask_from_means(qa, ka, layout, spec)
        ms["nabla_mask_from_means"] = t(lambda: be.mask_from_means(qa, ka, layout, spec))
    else:
        mask, plan = be.build_mask(qt, kt, layout, spec)
        ms["nabla_mask_from_tiled"] = t(lambda: be.build_mask(qt, kt, layout, spec))
    if st.precision == "fp8":
        from nabla_attn.backends.triton import attention_fp8

        ms["nabla_kernel"] = t(lambda: attention_fp8(qt, kt, vt, mask, plan, scale))
        out_t = attention_fp8(qt, kt, vt, mask, plan, scale)
        ms["nabla_untile"] = t(lambda: be.untile(out_t, layout, like=v))
    else:
        # What the op runs without gradients: the kernel writes natural order, no untiling pass.
        ms["nabla_kernel"] = t(lambda: be.attention_natural(qt, kt, vt, mask, plan, scale, like=v))
    res["density"] = mask.density
    log("attention alone (ms): " + ", ".join(f"{n} {x:.2f}" for n, x in ms.items()) + f"; density {mask.density:.4f}")


def eager_blocks(st: Setup, t: Callable[..., float], args: argparse.Namespace, res: dict[str, Any], device: str) -> None:
    ms, checks = res["ms"], res["checks"]
    with sdpa_ctx("cudnn", device), st.attention("none"):  # cross-attention keeps the best dense kernel
        ms["block_no_attention"] = t(st.run)
    for kind in ("cudnn", "flash") if device == "cuda" else ("cudnn",):
        with sdpa_ctx(kind, device):
            ms[f"block_dense_{kind}"] = t(st.run)
            if args.profile and device == "cuda" and kind == "cudnn":
                res["profile_dense_cudnn"] = H.profile_kernels(st.run)
    with sdpa_ctx("cudnn", device):
        dense_out = st.run()
        with st.attention("nabla") as handle:
            ms["block_nabla"] = t(st.run)
            if args.profile and device == "cuda":
                res["profile_nabla"] = H.profile_kernels(st.run)
            nabla_out = st.run()
            res["block_density"] = handle.stats().last.get("blocks.1.attn1")
        with st.attention("nabla", threshold=1.0):  # every block kept: the dense block through the sparse path
            full_out = st.run()
        again = st.run()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    checks.update(threshold1_rel_diff_vs_dense=rel(full_out, dense_out), remove_bit_exact=bool(torch.equal(again, dense_out)),
                  nabla_block_rel_diff_vs_dense=rel(nabla_out, dense_out))
    log(f"eager blocks: no attention {ms['block_no_attention']:.2f}, dense cuDNN {ms['block_dense_cudnn']:.2f}, "
        f"NABLA {ms['block_nabla']:.2f} ms (density {res['block_density']:.4f}); checks {checks}")


def forward_tiling(st: Setup, t: Callable[..., float], res: dict[str, Any], device: str) -> None:
    """NABLA with the hidden states tiled once per forward (``tiling="forward"``), and the dense block
    at the tiled length: what pushing the padding slots through the non-attention ops costs."""
    layout, (hidden, context, temb, rotary) = TokenLayout(st.grid), st.inputs
    cfg = NablaConfig(threshold=st.threshold, query_block=st.query_block, tiling="forward")
    hidden_t = tile(hidden, layout, dim=1)
    rotary_t = tuple(tile(r, layout, dim=1) for r in rotary)
    with sdpa_ctx("cudnn", device):
        with st.attention("nabla"):
            per_layer = st.run()
        handle = apply_nabla(st.model, cfg)
        handle.set_grid(st.grid)
        res["ms"]["block_nabla_forward_tiled"] = t(lambda: st.block(hidden_t, context, temb, rotary))
        out = untile(st.block(hidden_t, context, temb, rotary), layout, dim=1)
        remove_nabla(handle)
        res["ms"]["block_dense_cudnn_tiled_len"] = t(lambda: st.block(hidden_t, context, temb, rotary_t))
    res["checks"]["forward_vs_layer_tiling_max_abs_diff"] = float((out.float() - per_layer.float()).abs().max())


def train(st: Setup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace,
          res: dict[str, Any], device: str) -> None:
    """Forward + backward of the block (weights and input get gradients), without and with
    checkpointing; attention alone forward + backward for the bound."""
    ms, n = res["ms"], args.train_reps
    x = st.inputs[0].detach().clone().requires_grad_()
    g = torch.randn_like(x)

    def step(ckpt: bool) -> Callable[[], None]:
        def run() -> None:
            st.block.zero_grad(set_to_none=True)
            x.grad = None
            (checkpoint(st.run, x, use_reentrant=False) if ckpt else st.run(x)).backward(g)
        return run

    leaves = [y.transpose(1, 2).detach().clone().requires_grad_() for y in (q, k, v)]  # [B, S, H, D], as the block's
    go = torch.randn_like(leaves[0])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    views = lambda a, b, c: (a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2))  # noqa: E731
    with sdpa_ctx("cudnn", device):
        ms["attn_dense_cudnn_fwdbwd"] = H.time_fixed(H.grad_step(lambda *a: sdpa(*views(*a)).transpose(1, 2), leaves, go), n, 1)
        ms["attn_nabla_op_fwdbwd"] = H.time_fixed(H.grad_step(lambda *a: nabla_attention(
            *views(*a), st.grid, st.threshold, query_block=st.query_block).transpose(1, 2), leaves, go), n, 1)
        del leaves, go
        st.block.requires_grad_(True)
        for ckpt in (False, True):
            tag = "_ckpt" if ckpt else ""
            for kind, name in (("none", "no_attention"), ("dense", "dense_cudnn"), ("nabla", "nabla")):
                with st.attention(kind):
                    ms[f"train_{name}{tag}"] = H.time_fixed(step(ckpt), n, 1)
            log(f"training step{' with checkpointing' if ckpt else ''}: no attention {ms[f'train_no_attention{tag}']:.1f}, "
                f"dense cuDNN {ms[f'train_dense_cudnn{tag}']:.1f}, NABLA {ms[f'train_nabla{tag}']:.1f} ms")
    st.block.requires_grad_(False)
    st.block.zero_grad(set_to_none=True)


def compiled_blocks(st: Setup, t: Callable[..., float], args: argparse.Namespace, res: dict[str, Any], device: str) -> None:
    """Dense cuDNN, no attention and NABLA through one ``torch.compile`` wrapper (each processor
    compiles its own graphs), each started only within ``--budget-s``."""
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = 32
    ms, checks = res["ms"], res["checks"]
    compiled = torch.compile(st.block, backend=args.compile_backend)
    hidden, context, temb, rotary = st.inputs
    run = lambda h=hidden: compiled(h, context, temb, rotary)  # noqa: E731
    with torch.no_grad(), sdpa_ctx("cudnn", device):
        for kind, name in (("dense", "dense_cudnn"), ("none", "no_attention"), ("nabla", "nabla")):
            if time.time() - T0 > args.budget_s:
                log(f"compiled {name}: skipped (past --budget-s {args.budget_s})")
                continue
            with st.attention(kind):
                res[f"compile_{name}_s"] = H.first_call_s(run)
                if kind == "nabla":  # another input gives another mask: the graphs must be reused
                    graphs = H.dynamo_graphs()
                    run(hidden * 0.5 + 0.1)
                    checks["compiled_recompiled_on_new_mask"] = H.dynamo_graphs() != graphs
                ms[f"block_{name}_compiled"] = t(run)
            log(f"compiled {name}: {ms[f'block_{name}_compiled']:.2f} ms (compile {res[f'compile_{name}_s']:.0f} s)")


def bounds(res: dict[str, Any]) -> list[tuple[str, ...]]:
    """bound = measured no-attention time + d x dense cuDNN attention; share = bound / NABLA."""
    ms, d = res["ms"], res.get("block_density") or res["density"]
    a_fwd, a_step = ms.get("attn_dense_cudnn"), ms.get("attn_dense_cudnn_fwdbwd")
    cases = [("eager", "block_no_attention", "block_nabla", a_fwd, ("block_dense_cudnn", "block_dense_flash")),
             ("compiled", "block_no_attention_compiled", "block_nabla_compiled", a_fwd, ("block_dense_cudnn_compiled",)),
             ("training step", "train_no_attention", "train_nabla", a_step, ("train_dense_cudnn",)),
             ("training step, checkpointed", "train_no_attention_ckpt", "train_nabla_ckpt",
              None if a_step is None or a_fwd is None else a_step + a_fwd, ("train_dense_cudnn_ckpt",))]
    rows: list[tuple[str, ...]] = []
    res["bounds"] = {}
    for label, none, nabla, attn, denses in cases:
        if none not in ms or nabla not in ms or attn is None:
            continue
        bound = ms[none] + d * attn
        entry = {"no_attention_ms": ms[none], "attention_ms": attn, "density": d, "bound_ms": bound,
                 "nabla_ms": ms[nabla], "share_of_bound": bound / ms[nabla]}
        for dense in (x for x in denses if x in ms):
            entry[f"speedup_vs_{dense}"] = ms[dense] / ms[nabla]
            entry[f"limit_vs_{dense}"] = ms[dense] / bound
            rows.append((label, dense, f"{ms[dense]:.1f}", f"{ms[nabla]:.1f}", f"{ms[dense] / ms[nabla]:.2f}x",
                         f"{bound:.1f}", f"{ms[dense] / bound:.2f}x", f"{100 * bound / ms[nabla]:.1f}%"))
        res["bounds"][label] = entry
    return rows


def report(res: dict[str, Any], rows: list[tuple[str, ...]]) -> None:
    ms = res["ms"]
    d = res.get("block_density") or res["density"]
    print(f"\ndevice: {res['device']}, torch {res['torch']}, backend {res['backend']}, threshold {res['threshold']}, "
          f"density {d:.4f}, grid {'x'.join(map(str, res['grid']))}")
    for name, value in ms.items():
        print(f"  {name:32s} {value:9.2f} ms")
    print("\n| block | dense | dense ms | NABLA ms | speedup | bound ms | limit | share of bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if "block_dense_cudnn" in ms and "block_no_attention" in ms:
        print(f"attention inside the dense block (dense - no attention): {ms['block_dense_cudnn'] - ms['block_no_attention']:.2f}"
              f" ms; alone: {ms.get('attn_dense_cudnn', math.nan):.2f} ms")
    parts = [ms.get(k, 0.0) for k in ("nabla_tile_qkv", "nabla_mask_from_means", "nabla_mask_from_tiled", "nabla_untile")]
    untiling = ", untiling" if "nabla_untile" in ms else " (the kernel writes natural order)"
    print(f"NABLA op {ms.get('attn_nabla_op', math.nan):.2f} ms = kernel {ms.get('nabla_kernel', math.nan):.2f} + "
          f"tiling, mask{untiling} {sum(parts):.2f} ms; checks: {res['checks']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_wan_block needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    st = build(args, device, dtype)
    grid, layout, qb = st.grid, TokenLayout(st.grid), st.query_block
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                           "torch": torch.__version__, "grid": [grid.frames, grid.height, grid.width],
                           "tokens": grid.num_tokens, "query_block": qb, "precision": args.precision,
                           "dtype": str(dtype), "ms": {}, "checks": {}}

    def t(fn: Callable[[], Any]) -> float:
        return H.time_fixed(fn, args.reps, 1 if args.smoke else 2)

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)

    log(f"{res['device']} torch {torch.__version__}; grid {grid.frames}x{grid.height}x{grid.width} = {grid.num_tokens} tokens")
    block, (hidden, _, temb, rotary) = st.block, st.inputs
    with torch.no_grad():
        shift, scale_msa = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        q, k, v = project(block.attn1, (block.norm1(hidden.float()) * (1 + scale_msa) + shift).to(dtype), rotary)
        if args.threshold is None:  # random weights have no trained pattern: calibrate on the block's own q, k
            qt, kt = tile(q, layout), tile(k, layout)
            args.threshold = round(H.threshold_for_density(qt, kt, layout, args.target_density, qb)[0], 6)
            del qt, kt
        st.threshold = res["threshold"] = args.threshold
        res["backend"] = select_backend(q, "auto", False, qb)
        log(f"threshold {st.threshold} (target density {args.target_density}); backend='auto' chose {res['backend']!r}")
        attention_alone(st, q, k, v, t, res, device)
        save()
        eager_blocks(st, t, args, res, device)
        save()
        if args.forward_tiling:
            forward_tiling(st, t, res, device)
    if not args.no_train and args.precision == "bf16" and time.time() - T0 < 0.5 * args.budget_s:
        train(st, q, k, v, args, res, device)
        save()
    if not args.no_compile:
        compiled_blocks(st, t, args, res, device)
    rows = bounds(res)
    save()
    report(res, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
