"""Our own Triton block-sparse attention backend (forward and backward), see ``kernels/attention.py``.

Runs CUDA tensors in float16, bfloat16 or float32 (float32 with full-precision dots) with head_dim
16, 32, 64 or 128. The kernels are imported lazily, so importing this module never needs Triton
and never fixes Triton's interpreter mode (tests turn the interpreter on before the first import
and then run these same kernels on the CPU).

Block lists are cached on the :class:`BlockSparseMask` (``mask._cache``): the kv lists under
``"kv"`` (the fused mask builder writes them directly), the union lists for 64-row tables on
128-row tiles under ``"kv_union128"``, and the transposed (q-side) lists the backward needs under
``"q_tiles64"`` / ``"q_tiles128"``, built only when a gradient is needed.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..grid import BLOCK_TOKENS, block_counts_on
from ..masks import BlockSparseMask

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Launch choices of the Triton kernels (benchmarks sweep them; the defaults are measured).

    Forward:
    - ``tile_m_for_64``: query tile for ``query_block=64`` tables (64 = one row per tile; 128 = two
      rows per tile with per-half masking).
    - ``pair``: 128-wide key tiles from two listed blocks (pointer loads only).
    - ``tma``: K/V tiles by tensor descriptors on Hopper and newer; other cards run the
      pointer-load kernel.
    - ``prefetch``: issue the next key tile's Q.K^T before this tile's softmax.
    - ``fold``: fold the softmax scale into exp2 (applied only when the scale is positive).
    - ``mask_full_blocks``: apply the per-key validity mask even when no block has padding (to
      measure what skipping it saves).
    - ``pad_branch``: with padding, mask only the scores of partial blocks, behind a branch
      (TMA kernel).
    - ``lazy_rescale``: rescale the accumulator only when a row max grows by more than 2^8.
    - ``fwd_warps`` / ``fwd_stages``: for 128-row tiles (64-row tiles always use 4 warps).
    - ``warp_specialized``: on Hopper (sm_90), run the forward of 128-row tables in float16 or
      bfloat16 with a positive scale by the warp-specialised Gluon kernel
      (``kernels/attention_ws.py``; same output, same log-sum-exp); other cases and cards run the
      Triton kernel. ``ws_stages``: its ring of K/V shared-memory slots; ``ws_pair``: two listed
      key blocks per step (128 keys).

    Backward:
    - ``bwd_tile_m``: query tile of the backward kernels; 64 runs a 128-row table as its 64-row
      expansion (1.5x faster than 128-row tiles on H100).
    - ``bwd_tma``: K/V tiles of the dQ kernel and q/dO tiles of the dK/dV kernel (64-row tiles)
      by tensor descriptors on Hopper and newer.
    - ``dq_*`` / ``dkdv_*``: warps and pipeline stages of the two kernels.
    """

    # Measured (docs/kernel-notes.md): 64-row tiles for 64-row tables (H100: 23.4 ms vs 31.1 ms
    # with 128-row tiles + per-half masks at 10% density); 4 warps / 2 stages forward (21.3 vs
    # 22.5 ms for 8 / 3); plain 64-row key tiles (pairs were not faster). On H200 at Wan 14B 720p,
    # 10%: TMA loads once the scale fold and the skipped validity mask shortened the softmax (18.1
    # vs 21.1 ms with 128-row tables, 21.4 vs 22.9 ms with 64-row tables); the padded-block branch
    # at 21x45x80 (27.6 vs 31.3 ms, 31.6 vs 32.6 ms); TMA in the backward (fwd+bwd 74.9 vs 77.1 ms).
    # The warp-specialised Gluon forward with 128-key steps and 3 slots (H200, same run): 15.6 vs
    # 18.3 ms at 21x40x80 and 22.4 vs 27.5 ms at 21x45x80 (1 slot more does not fit at head_dim 128).
    tile_m_for_64: int = 64
    pair: bool = False
    tma: bool = True
    prefetch: bool = False
    fold: bool = True
    mask_full_blocks: bool = False
    pad_branch: bool = True
    lazy_rescale: bool = False
    bwd_tile_m: int = 64
    bwd_tma: bool = True
    fwd_warps: int = 4
    fwd_stages: int = 2
    warp_specialized: bool = True
    ws_stages: int = 3
    ws_pair: bool = True
    dq_warps: int = 8
    dq_stages: int = 2
    dkdv_warps: int = 8
    dkdv_stages: int = 2


DEFAULT_CONFIG = KernelConfig()


def _interpreting() -> bool:
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


def check_supported(q: torch.Tensor) -> str | None:
    """Why this backend cannot run ``q`` (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'nabla-attn[triton]')"
    if not q.is_cuda and not _interpreting():
        return f"tensors on {q.device} (the Triton kernel needs CUDA)"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(q.device)} (needs >= 8.0)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the Triton kernel supports float16, bfloat16, float32)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the Triton kernel supports {HEAD_DIMS})"
    return None


def _has_tma(q: torch.Tensor) -> bool:
    """Hopper or newer (the bulk tensor copy engine), or the interpreter, which emulates it."""
    if q.is_cuda:
        return torch.cuda.get_device_capability(q.device) >= (9, 0)
    return _interpreting()


def _bh_strides(t: torch.Tensor) -> tuple[int, int]:
    """Batch/head strides with broadcast (size-1) dimensions read through stride 0."""
    return (t.stride(0) if t.shape[0] != 1 else 0, t.stride(1) if t.shape[1] != 1 else 0)


def _plan(mask: BlockSparseMask, cfg: KernelConfig) -> tuple[int, bool]:
    """(query tile rows, whether 64-row halves are masked separately)."""
    if mask.query_block == 128:
        return 128, False
    return (128, True) if cfg.tile_m_for_64 == 128 else (64, False)


def _kv_lists(mask: BlockSparseMask, tile_m: int, submask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.mask_build import compact_table

    if submask:
        key = "kv_union128"
        if key not in mask._cache:
            mask._cache[key] = compact_table(mask.kept, row_group=2)
        return mask._cache[key]
    if "kv" not in mask._cache:
        mask._cache["kv"] = compact_table(mask.kept)
    return mask._cache["kv"]


def _q_lists(mask: BlockSparseMask, tile_m: int, submask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.mask_build import compact_table

    key = f"q_tiles{tile_m}"
    if key not in mask._cache:
        if submask:
            n_tiles = -(-mask.kept.shape[2] // 2)
            mask._cache[key] = compact_table(mask.kept, col_group=2, transpose=True, n_cols=n_tiles)
        else:
            mask._cache[key] = compact_table(mask.kept, transpose=True)
    return mask._cache[key]


def _as_64_rows(mask: BlockSparseMask) -> BlockSparseMask:
    """The same table with 64-token query rows (a 128-row table repeats each row twice)."""
    if mask.query_block == BLOCK_TOKENS:
        return mask
    if "as64" not in mask._cache:
        kept = mask.kept.repeat_interleave(2, dim=2)[:, :, : mask.layout.num_blocks]
        mask._cache["as64"] = BlockSparseMask(kept, mask.layout, BLOCK_TOKENS)
    return mask._cache["as64"]


def _warp_specialized(q: torch.Tensor, mask: BlockSparseMask, scale: float, cfg: KernelConfig) -> bool:
    """Whether the Gluon kernel runs this forward (see ``KernelConfig.warp_specialized``)."""
    if not (cfg.warp_specialized and q.is_cuda and mask.query_block == 128 and scale > 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        return False
    # wgmma, the instruction the kernel is written in, exists on sm_90 only.
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return _gluon_tested()


@functools.cache
def _gluon_tested() -> bool:
    """Gluon is Triton's experimental dialect and its API moves between releases: the kernel runs on
    the release series it was validated on (3.6); others get the Triton kernel."""
    try:
        import triton
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


def _ws_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                cnt: torch.Tensor, idx: torch.Tensor, bcnt: torch.Tensor, pad: bool, scale: float,
                cfg: KernelConfig) -> None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ..kernels.attention_ws import _attn_fwd_ws

    B, H, S, D = q.shape
    smem = (2 + 2 * cfg.ws_stages * (2 if cfg.ws_pair else 1)) * BLOCK_TOKENS * D * q.element_size()
    if smem > 227 * 1024:
        raise ValueError(f"ws_stages={cfg.ws_stages} with ws_pair={cfg.ws_pair} needs {smem // 1024} KiB of shared "
                         f"memory at head_dim {D}; Hopper has 227 KiB")
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_TOKENS, D], gl.bfloat16 if q.dtype == torch.bfloat16
                                                  else gl.float16)
    qd, kd, vd = (TensorDescriptor.from_tensor(x.view(B * H * S, D), [BLOCK_TOKENS, D], layout) for x in (q, k, v))
    _attn_fwd_ws[(-(-S // 128), B * H)](
        qd, kd, vd, o, lse, cnt, idx, bcnt, *_bh_strides(cnt), *_bh_strides(idx), idx.stride(2),
        H, S, scale * _LOG2E, HEAD_DIM=D, NUM_STAGES=cfg.ws_stages, PAD=pad, PAIR=cfg.ws_pair,
        # 3 warpgroups (two 4-warp consumers, a 1-warp producer) at 168 registers; setmaxnreg then
        # moves them to 240 per consumer thread and 24 for the producer.
        num_warps=4, maxnreg=168,
    )


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _descriptor(x: torch.Tensor, rows: int) -> Any:
    """A tensor descriptor over contiguous ``[B, H, S, D]`` viewed as ``[B*H*S, D]``, ``rows x D`` boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, S, D = x.shape
    return TensorDescriptor.from_tensor(x.view(B * H * S, D), [rows, D])


def _padded(mask: BlockSparseMask, cfg: KernelConfig) -> bool:
    """Some key block has padding slots (else every listed block is whole: no per-score mask)."""
    return cfg.mask_full_blocks or mask.layout.tiled_len != mask.layout.seq_len


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,  # type: ignore[override]
                scale: float, cfg: KernelConfig) -> torch.Tensor:
        from ..kernels.attention import _attn_fwd

        B, H, S, D = q.shape
        tile_m, submask = _plan(mask, cfg)
        cnt, idx = _kv_lists(mask, tile_m, submask)
        sub = mask.kept.view(torch.uint8)
        bcnt = block_counts_on(mask.layout, q.device)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        n_tiles = -(-S // tile_m)
        if cnt.shape[2] != n_tiles:
            raise RuntimeError(f"kv lists have {cnt.shape[2]} rows, the kernel needs {n_tiles} tiles of {tile_m}")
        if _warp_specialized(q, mask, scale, cfg):
            _ws_forward(q, k, v, o, lse, cnt, idx, bcnt, _padded(mask, cfg), scale, cfg)
        else:
            fold = cfg.fold and scale > 0
            tma = cfg.tma and not cfg.pair and _has_tma(q)
            kk, vv = (_descriptor(k, BLOCK_TOKENS), _descriptor(v, BLOCK_TOKENS)) if tma else (k, v)
            _attn_fwd[(n_tiles, B * H)](
                q, kk, vv, o, lse, cnt, idx, bcnt, sub,
                *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                *_bh_strides(cnt), *_bh_strides(idx), idx.stride(2), *_bh_strides(sub), sub.stride(2),
                H, S, mask.kept.shape[2], scale * _LOG2E,
                BLOCK_M=tile_m, HEAD_DIM=D, PAIR=cfg.pair, SUBMASK=submask, IEEE=q.dtype == torch.float32,
                PAD=_padded(mask, cfg), FOLD=fold, PREFETCH=cfg.prefetch and not cfg.pair,
                PAD_BRANCH=cfg.pad_branch and tma, LAZY=cfg.lazy_rescale and fold, TMA=tma,
                num_warps=cfg.fwd_warps if tile_m == 128 else 4, num_stages=cfg.fwd_stages,
            )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.cfg = mask, scale, cfg
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:  # type: ignore[override]
        from ..kernels.attention import _attn_bwd_dkdv, _attn_bwd_dq

        q, k, v, o, lse = ctx.saved_tensors
        mask, scale, cfg = ctx.mask, ctx.scale, ctx.cfg
        B, H, S, D = q.shape
        do = do.contiguous()
        list_shift = 0
        if cfg.bwd_tile_m == BLOCK_TOKENS:
            if mask.query_block == 128:
                # dQ on 64-row tiles reads the 128-row table's own kv lists (tile i: row i // 2).
                cnt, idx = _kv_lists(mask, 128, False)
                list_shift = 1
            mask = _as_64_rows(mask)
            cfg = replace(cfg, tile_m_for_64=BLOCK_TOKENS)
        tile_m, submask = _plan(mask, cfg)
        if not list_shift:
            cnt, idx = _kv_lists(mask, tile_m, submask)
        qcnt, qidx = _q_lists(mask, tile_m, submask)
        sub = mask.kept.view(torch.uint8)
        bcnt = block_counts_on(mask.layout, q.device)
        # Written by the dQ kernel, read by the dK/dV kernel.
        delta = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        warps_m = 8 if tile_m == 128 else 4
        pad = _padded(mask, cfg)
        tma = cfg.bwd_tma and _has_tma(q)
        kk, vv = (_descriptor(k, BLOCK_TOKENS), _descriptor(v, BLOCK_TOKENS)) if tma else (k, v)
        # q/dO boxes only for 64-row tiles: a 128-row box could cross into the next head.
        q_tma = tma and tile_m == BLOCK_TOKENS
        qq, dd = (_descriptor(q, tile_m), _descriptor(do, tile_m)) if q_tma else (q, do)
        _attn_bwd_dq[(-(-S // tile_m), B * H)](
            q, kk, vv, o, do, dq, lse, delta, cnt, idx, bcnt, sub,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
            *_bh_strides(cnt), *_bh_strides(idx), idx.stride(2), *_bh_strides(sub), sub.stride(2),
            H, S, mask.kept.shape[2], scale * _LOG2E, scale,
            BLOCK_M=tile_m, HEAD_DIM=D, SUBMASK=submask, IEEE=q.dtype == torch.float32, PAD=pad, TMA=tma,
            LIST_SHIFT=list_shift, num_warps=min(cfg.dq_warps, warps_m), num_stages=cfg.dq_stages,
        )
        _attn_bwd_dkdv[(S // BLOCK_TOKENS, B * H)](
            qq, k, v, dd, dk, dv, lse, delta, qcnt, qidx, bcnt, sub,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_bh_strides(qcnt), *_bh_strides(qidx), qidx.stride(2), *_bh_strides(sub), sub.stride(2),
            H, S, mask.kept.shape[2], scale * _LOG2E, scale,
            BLOCK_M=tile_m, HEAD_DIM=D, SUBMASK=submask, IEEE=q.dtype == torch.float32, PAD=pad, TMA=q_tma,
            num_warps=min(cfg.dkdv_warps, warps_m), num_stages=cfg.dkdv_stages,
        )
        return dq, dk, dv, None, None, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    scale: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Block-sparse attention on tiled ``[B, H, tiled_len, D]`` tensors through our Triton kernels.

    Differentiable in q, k, v. ``mask`` may have size-1 batch/head dimensions (broadcast).
    """
    reason = check_supported(q)
    if reason is not None:
        raise ValueError(f"triton backend cannot run {reason}; use backend='flex' or 'reference'")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"triton backend needs v's head_dim equal to q's, got {v.shape[-1]} and {q.shape[-1]}")
    B, H, S, _ = q.shape
    if S != mask.layout.tiled_len:
        raise ValueError(f"q has {S} tokens, the mask's layout is tiled to {mask.layout.tiled_len}")
    b, h = mask.kept.shape[:2]
    if b not in (1, B) or h not in (1, H):
        raise ValueError(f"mask of batch x heads {b}x{h} cannot serve q of {B}x{H}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    cfg = config or _env_config()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _BlockSparseAttention.apply(q, k, v, mask, float(scale), cfg)


def _env_config() -> KernelConfig:
    """DEFAULT_CONFIG, optionally overridden by ``NABLA_TRITON_CONFIG="pair=1,fwd_warps=4"`` (benchmarks)."""
    spec = os.environ.get("NABLA_TRITON_CONFIG")
    if not spec:
        return DEFAULT_CONFIG
    kw: dict[str, int | bool] = {}
    for item in spec.split(","):
        key, _, val = item.partition("=")
        if key not in KernelConfig.__dataclass_fields__:
            raise ValueError(f"NABLA_TRITON_CONFIG: unknown field {key!r}")
        kw[key] = bool(int(val)) if isinstance(getattr(DEFAULT_CONFIG, key), bool) else int(val)
    return replace(DEFAULT_CONFIG, **kw)
