"""Our Triton block-sparse attention backend (forward and backward; ``kernels/attention.py``), with
the warp-specialised Gluon forward on Hopper (``kernels/attention_ws.py``).

Runs CUDA tensors (and, under Triton's interpreter, CPU tensors) in float16, bfloat16 or float32
(float32 with full-precision dots) with head_dim 16, 32, 64 or 128, equal for q and v. Kernels are
imported lazily, so importing this module never needs Triton.

The attention is one ``torch.library`` custom op with a fake implementation and registered autograd
(``nabla_attn::triton_attention`` and its backward), so ``torch.compile`` traces a model through it.
Its kv lists come with the mask from the fused builder, or from one compaction of ``mask.kept``
per call; the q-side lists of the backward are compacted from the table inside the backward. Nothing
is cached on the mask.

``precision="fp8"`` (forward only, sm_89+): :func:`attention_fp8` runs ``kernels/attention_fp8.py``
(e4m3 Q.K^T with per-block scales and a smoothed K; P.V in the input dtype or in e4m3), its own
custom op ``nabla_attn::triton_attention_fp8``; :func:`fp8_unsupported` says what it cannot run.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any, Sequence

import torch

from ..constants import BLOCK_TOKENS
from ..grid import TokenLayout
from ..masks import BlockSparseMask
from . import tiling
from .base import Request
from .fused import GpuMaskBackend, KvLists, kv_lists

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KernelConfig:
    """Launch choices of the kernels (benchmarks compare them; the defaults are measured, see
    ``docs/kernel-notes.md``).

    - ``tma``: K/V tiles of the Triton forward by tensor descriptors on Hopper and newer (other
      cards run pointer loads). ``bwd_tma``: the same for the backward (K/V in dQ, q/dO in dK/dV).
    - ``warp_specialized``: on Hopper (sm_90), the forward in float16 or bfloat16 with a positive
      scale runs the Gluon kernel (same output contract); ``ws_q64``: also for 64-row tables (one
      stream of the union of two rows' lists); ``ws_stages``: its ring of K/V shared-memory slots
      (3 slots of 128 keys is the most that fits at head_dim 128).
    - ``fwd_warps`` / ``fwd_stages``: the Triton forward on 128-row tiles (64-row tiles use 4 warps).
    - ``dq_*`` / ``dkdv_*``: warps and pipeline stages of the two backward kernels (64-row tiles).
    """

    tma: bool = True
    warp_specialized: bool = True
    ws_q64: bool = True
    ws_stages: int = 3
    fwd_warps: int = 4
    fwd_stages: int = 2
    bwd_tma: bool = True
    dq_warps: int = 4
    dq_stages: int = 2
    dkdv_warps: int = 4
    dkdv_stages: int = 2

    def encode(self) -> list[int]:
        return [int(x) for x in astuple(self)]

    @staticmethod
    def decode(values: Sequence[int]) -> "KernelConfig":
        kinds = [f.type for f in fields(KernelConfig)]
        return KernelConfig(*(bool(v) if kind in ("bool", bool) else int(v) for v, kind in zip(values, kinds)))


DEFAULT_CONFIG = KernelConfig()


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def ws_eligible(dtype: torch.dtype, head_dim: int, query_block: int, scale: float, capability: tuple[int, int],
                cfg: KernelConfig) -> bool:
    """Whether a forward with these properties runs the Gluon kernel (``KernelConfig.warp_specialized``
    for 128-row tables, with ``ws_q64`` for 64-row ones): float16/bfloat16, head_dim 64 or 128, a
    positive scale (it folds into exp2), and sm_90 (wgmma, the instruction the kernel is written
    in, exists there only)."""
    table = query_block == 128 or (query_block == 64 and cfg.ws_q64)
    return (cfg.warp_specialized and table and scale > 0 and dtype in (torch.float16, torch.bfloat16)
            and head_dim in (64, 128) and capability == (9, 0))


def warp_specialized(q: torch.Tensor, query_block: int, scale: float, cfg: KernelConfig) -> bool:
    """:func:`ws_eligible` for ``q`` on its device, on the Triton release the kernel was validated on."""
    if not (q.is_cuda and ws_eligible(q.dtype, q.shape[-1], query_block, scale, _capability(q.device), cfg)):
        return False
    from ..kernels.attention_ws import gluon_validated

    return gluon_validated()


@torch.library.custom_op("nabla_attn::triton_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
             kept: torch.Tensor, layout: Sequence[int], query_block: int, scale: float,
             config: Sequence[int], like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, lse)``, the output tiled like q, or with ``like`` in natural order with ``like``'s
    memory layout (forward only): the Gluon forward's epilogue writes it there (no untiling pass);
    the Triton forward's output is untiled (its natural-order store measured slower,
    ``docs/kernel-notes.md`` v38)."""
    from ..kernels import attention as kernel

    cfg = KernelConfig.decode(config)
    lay = TokenLayout.from_key(layout)
    bcnt = lay.block_counts(q.device)
    if warp_specialized(q, query_block, scale, cfg):
        from ..kernels import attention_ws

        natural = {} if like is None else {"out": tiling.untile_output(q, lay, -2, like),
                                           "rows": lay.table("tile_rows", q.device)}
        # 64-row tables stream the union of two rows' lists, the rows paired by the layout.
        q64 = query_block == 64
        pairs = lay.table("query_pairs", q.device) if q64 else None
        return attention_ws.forward(q, k, v, counts, indices, bcnt, scale, padded=lay.padded, stages=cfg.ws_stages,
                                    kept=kept if q64 else None, pairs=pairs, **natural)
    o, lse = kernel.forward(q, k, v, counts, indices, bcnt, scale, tile_m=query_block, padded=lay.padded,
                            tma=cfg.tma and kernel.has_tma(q), warps=cfg.fwd_warps, stages=cfg.fwd_stages)
    return (o, lse) if like is None else (tiling.untile(o, lay, kernel=True, like=like), lse)


@_forward.register_fake
def _(q, k, v, counts, indices, kept, layout, query_block, scale, config, like=None):  # type: ignore[no-untyped-def]
    out = torch.empty_like(q) if like is None else tiling.untile_output(q, TokenLayout.from_key(layout), -2, like)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nabla_attn::triton_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor,
                 layout: Sequence[int], query_block: int, scale: float,
                 config: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernel
    from ..kernels.mask_build import compact

    cfg = KernelConfig.decode(config)
    lay = TokenLayout.from_key(layout)
    # The backward runs on 64-row tiles: a 128-row table's dQ reads its own kv lists (tile i: row
    # i // 2), and dK/dV reads the q-side lists of its 64-row expansion.
    kept64 = kept if query_block == BLOCK_TOKENS else kept.repeat_interleave(2, dim=2)[:, :, : lay.num_blocks]
    q_counts, q_indices = compact(kept64, transpose=True)
    return kernel.backward(
        do.contiguous(), q, k, v, o, lse, counts, indices, q_counts, q_indices, lay.block_counts(q.device), scale,
        list_shift=query_block // BLOCK_TOKENS - 1, padded=lay.padded, tma=cfg.bwd_tma and kernel.has_tma(q),
        dq_warps=cfg.dq_warps, dq_stages=cfg.dq_stages, dkdv_warps=cfg.dkdv_warps, dkdv_stages=cfg.dkdv_stages,
    )  # fmt: skip


@_backward_op.register_fake
def _(do, q, k, v, o, lse, counts, indices, kept, layout, query_block, scale, config):  # type: ignore[no-untyped-def]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, counts, indices, kept, ctx.layout, ctx.query_block, ctx.scale, ctx.config, like = inputs
    o, lse = output
    ctx.natural = like is not None
    ctx.save_for_backward(q, k, v, o, lse, counts, indices, kept)


def _backward(ctx: Any, do: torch.Tensor, dlse: torch.Tensor | None) -> tuple:
    if ctx.natural:
        raise RuntimeError("nabla_attn::triton_attention with a natural-order output (like=) is forward only: "
                           "the backward reads the tiled output, so calls that need gradients untile it instead")
    q, k, v, o, lse, counts, indices, kept = ctx.saved_tensors
    dq, dk, dv = _backward_op(do, q, k, v, o, lse, counts, indices, kept, ctx.layout, ctx.query_block, ctx.scale,
                              ctx.config)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup)


class TritonBackend(GpuMaskBackend):
    """Our kernels: fused mask with kv lists, Triton (and on Hopper Gluon) attention."""

    name = "triton"
    fallback = "backend='flex' or 'reference'"
    wants_lists = True

    def unsupported(self, req: Request) -> str | None:
        if req.dtype not in SUPPORTED_DTYPES:
            return f"dtype {req.dtype} (the Triton kernel supports float16, bfloat16, float32)"
        if req.head_dim not in HEAD_DIMS:
            return f"head_dim {req.head_dim} (the Triton kernel supports {HEAD_DIMS})"
        if req.v_head_dim != req.head_dim:
            return f"v head_dim {req.v_head_dim} != q head_dim {req.head_dim} (the Triton kernel needs them equal)"
        reason = super().unsupported(req)
        if reason:
            return reason
        if req.device.type == "cuda" and _capability(req.device) < (8, 0):
            return f"compute capability {_capability(req.device)} (needs >= 8.0)"
        return None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float, config: KernelConfig | None = None) -> torch.Tensor:
        """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors; differentiable in q, k, v.
        ``mask`` may have size-1 batch/head dimensions (broadcast); ``plan``: its :class:`KvLists`
        from :meth:`build_mask` (None: compacted here)."""
        return self._attend(q, k, v, mask, plan, scale, None, config)

    def attention_natural(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                          plan: Any, scale: float, like: torch.Tensor,
                          config: KernelConfig | None = None) -> torch.Tensor:
        """:meth:`attention` with the output in natural order and ``like``'s memory layout. A
        forward-only call goes to the kernel op with ``like`` (on the Gluon forward the epilogue
        writes natural order: no untiling pass); with gradients the tiled output, which the backward
        reads, is untiled (writing both orders measured no faster in a training step,
        ``docs/kernel-notes.md`` v38)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return self.untile(self._attend(q, k, v, mask, plan, scale, None, config), mask.layout, like=like)
        return self._attend(q, k, v, mask, plan, scale, like, config)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                scale: float, like: torch.Tensor | None, config: KernelConfig | None) -> torch.Tensor:
        lists = plan if isinstance(plan, KvLists) else self.plan(mask)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cfg = config or DEFAULT_CONFIG
        out, _ = _forward(q, k, v, lists.counts, lists.indices, mask.kept, mask.layout.key, mask.query_block,
                          float(scale), cfg.encode(), like)
        return out


# ----------------------------------------------------------------------- FP8 forward (issue 18)
FP8_DTYPES = (torch.float16, torch.bfloat16)
FP8_HEAD_DIMS = (32, 64, 128)


@torch.library.custom_op("nabla_attn::triton_attention_fp8", mutates_args=())
def _forward_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
                 layout: Sequence[int], query_block: int, scale: float, fp8_pv: bool, qk_int8: bool,
                 config: Sequence[int]) -> torch.Tensor:
    from ..kernels import attention as kernel
    from ..kernels import attention_fp8

    cfg = KernelConfig.decode(config)
    lay = TokenLayout.from_key(layout)
    return attention_fp8.forward(q, k, v, counts, indices, lay.block_counts(q.device), scale, tile_m=query_block,
                                 padded=lay.padded, tma=cfg.tma and kernel.has_tma(q), fp8_pv=fp8_pv,
                                 qk_int8=qk_int8, warps=cfg.fwd_warps, stages=cfg.fwd_stages)


@_forward_fp8.register_fake
def _(q, k, v, counts, indices, layout, query_block, scale, fp8_pv, qk_int8, config):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)


def fp8_capable(capability: tuple[int, int]) -> bool:
    """e4m3 tensor-core products: sm_89 (Ada) and newer."""
    return tuple(capability) >= (8, 9)


def fp8_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why ``precision="fp8"`` cannot run these tensors on the Triton backend (None when it can):
    float16/bfloat16, head_dim 32/64/128 equal for q and v, forward only, CUDA sm_89 or newer (e4m3
    tensor-core products) or Triton's interpreter."""
    if q.dtype not in FP8_DTYPES:
        return f"dtype {q.dtype} (fp8 takes float16 or bfloat16 inputs)"
    if q.shape[-1] not in FP8_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} / v head_dim {v.shape[-1]} (fp8 needs equal head_dims in {FP8_HEAD_DIMS})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "inputs that require grad (the fp8 kernel is forward only; use precision='bf16' for training)"
    if q.device.type == "cuda":
        cap = _capability(q.device)
        return None if fp8_capable(cap) else f"compute capability {cap} (fp8 needs sm_89 or newer: Ada, Hopper)"
    from .fused import interpreting

    if not interpreting():
        return f"tensors on {q.device} (fp8 needs CUDA, or Triton's CPU interpreter for tests)"
    return None


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float, *, fp8_pv: bool = False, qk_int8: bool = False,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """:meth:`TritonBackend.attention` with e4m3 products (``kernels/attention_fp8.py``), forward only.
    ``fp8_pv``: P.V in e4m3 too; ``qk_int8``: Q.K^T in int8 instead (experimental, for the
    benchmark). Callers check :func:`fp8_unsupported` first."""
    lists = plan if isinstance(plan, KvLists) else kv_lists(mask.kept)
    cfg = config or DEFAULT_CONFIG
    return _forward_fp8(q.contiguous(), k.contiguous(), v.contiguous(), lists.counts, lists.indices,
                        mask.layout.key, mask.query_block, float(scale), bool(fp8_pv), bool(qk_int8), cfg.encode())
