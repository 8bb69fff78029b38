"""Block-sparse attention forward with FP8 (e4m3) matrix products, for sm_89 / sm_90 (issue 18).

Same contract as :func:`nabla_attn.kernels.attention.forward` (tiled ``[B, H, S, D]``, the kv lists
``counts [B,H,Qt]`` / ``indices [B,H,Qt,Kb]`` with broadcast size-1 batch/head dimensions, 64-token
key blocks, 64- or 128-row query tiles, padding rows masked, a row with no kept key -> output 0),
forward only and without the log-sum-exp (smoothing K shifts it, see below).

Quantisation (:func:`quantize`, two small Triton passes over the tiled tensors):

- Q: per (batch, head) and 64-row block, ``scale = amax / 448``, e4m3 values ``q / scale``.
- K: smoothed first: ``k - mean_k`` with the per-(batch, head) mean over real tokens. Every score
  of a query row moves by the same ``q . mean_k``, so the softmax is unchanged (SageAttention's
  trick); it removes the shared offset that would otherwise eat the e4m3 range. Then per 64-token
  key block as Q. Padding rows stay 0.
- V (only with ``fp8_pv``): smoothed by its per-(batch, head) channel mean (added back after the
  normalisation: the probabilities of a row sum to 1), scaled per channel (``amax / 448`` over real
  tokens) and stored transposed, ``[B, H, D, S]``, so the P.V product reads a K-major operand
  (Hopper's fp8 wgmma takes K-major operands only; the Triton fused-attention tutorial does the same).

Kernel: ``s = dot(q8, k8^T)`` in fp32 on the tensor cores, times ``scale_q[row] * scale_k[block]``
(folded with the softmax scale into the exp2 argument for a positive scale), then the same online
softmax in base 2 as the bf16 kernel. P.V: ``p`` in the input dtype against V in the input dtype
(default), or ``fp8_pv``: ``p * 448`` in e4m3 (p is in [0, 1]) against the e4m3 V, the
``scale_v / 448`` dequantisation applied once to the output columns at the end.

Experimental: ``qk_int8`` runs Q.K^T in int8 (per-block ``amax / 127``, int32 sums) instead of e4m3,
SageAttention's choice (7 bits of the block range instead of 3 mantissa bits), for the benchmark to
compare; the public ``precision="fp8"`` runs e4m3.

Triton's interpreter (3.6) casts float32 to e4m3 without the carry of a mantissa that rounds up to
the next power of two (7.84 -> 4.0); under the interpreter the casts first round on the e4m3 grid in
float32 (``EXACT``), which gives the values of PyTorch's and the GPU's round-to-nearest-even (a tiny negative may
become +0 instead of -0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import BLOCK_TOKENS
from .attention import program_ids

LOG2E = 1.4426950408889634
E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


@triton.jit
def _e4m3(x, EXACT: tl.constexpr):
    """float32 -> e4m3, round to nearest even, saturating at +-448."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EXACT:
        # Round on the e4m3 grid in float32 first (ulp = 2^(exponent - 3), subnormals 2^-9), so the
        # interpreter's cast only ever sees representable values.
        bits = x.to(tl.int32, bitcast=True)
        e = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
        ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)
        x = ((x / ulp + 12582912.0) - 12582912.0) * ulp
    return x.to(tl.float8e4nv)


@triton.jit
def _stats(X, SUM, MAX, MIN, BCNT, S, NB, HEAD_DIM: tl.constexpr):
    """Per (batch*head, 64-token block): column sum, max and min over the block's real rows."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_n < tl.load(BCNT + blk))[:, None]
    tok = (blk * 64 + offs_n).to(tl.int64)
    x = tl.load(X + bh * S * HEAD_DIM + tok[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    out = (bh * NB + blk) * HEAD_DIM + offs_d
    tl.store(SUM + out, tl.sum(tl.where(ok, x, 0.0), 0))
    tl.store(MAX + out, tl.max(tl.where(ok, x, float("-inf")), 0))
    tl.store(MIN + out, tl.min(tl.where(ok, x, float("inf")), 0))


@triton.jit
def _quant_blocks(X, X8, SCALE, MEAN, BCNT, S, NB, HEAD_DIM: tl.constexpr, SMOOTH: tl.constexpr,
                  EXACT: tl.constexpr, INT8: tl.constexpr):
    """One 64-row block of one (batch, head): optional mean subtraction (real rows only; padding
    rows stay 0), ``scale = amax / 448`` (1 for an all-zero block), e4m3 values; ``INT8``:
    ``scale = amax / 127`` and int8 values rounded half away from zero."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = (blk * 64 + offs_n).to(tl.int64)
    ptr = bh * S * HEAD_DIM + tok[:, None] * HEAD_DIM + offs_d[None, :]
    x = tl.load(X + ptr).to(tl.float32)
    if SMOOTH:
        ok = (offs_n < tl.load(BCNT + blk))[:, None]
        x = tl.where(ok, x - tl.load(MEAN + bh * HEAD_DIM + offs_d)[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    if INT8:
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        y = x * (127.0 / tl.where(amax > 0, amax, 127.0))
        tl.store(X8 + ptr, (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8))
    else:
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        tl.store(X8 + ptr, _e4m3(x * (448.0 / tl.where(amax > 0, amax, 448.0)), EXACT))
    tl.store(SCALE + bh * NB + blk, scale)


@triton.jit
def _quant_v_t(V, VT8, SCALE, MEAN, BCNT, S, HEAD_DIM: tl.constexpr, EXACT: tl.constexpr):
    """One 64-token block of V: ``(v - mean) / scale`` per channel in e4m3, stored transposed ``[D, S]``."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = (blk * 64 + offs_n).to(tl.int64)
    base = bh * S * HEAD_DIM
    x = tl.load(V + base + tok[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    ok = (offs_n < tl.load(BCNT + blk))[:, None]
    mean = tl.load(MEAN + bh * HEAD_DIM + offs_d)
    inv = 1.0 / tl.load(SCALE + bh * HEAD_DIM + offs_d)
    x = tl.where(ok, (x - mean[None, :]) * inv[None, :], 0.0)
    tl.store(VT8 + base + offs_d[None, :].to(tl.int64) * S + tok[:, None], _e4m3(x, EXACT))


@triton.jit
def _attn_fwd_fp8(
    Q8, K8, V, O, SQ, SK, SV, VM, CNT, IDX, BCNT,
    c_b, c_h, i_b, i_h, i_r,
    H, S, NB, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PAD: tl.constexpr, FOLD: tl.constexpr,
    TMA: tl.constexpr, FP8_PV: tl.constexpr, EXACT: tl.constexpr, QK_INT8: tl.constexpr,
):
    """q8, k8: contiguous e4m3 ``[B, H, S, D]``; V: contiguous ``[B, H, S, D]`` in the input dtype, or
    (``FP8_PV``) e4m3 ``[B, H, D, S]``. ``TMA``: K8 and V are tensor descriptors (K8 over
    ``[B*H*S, D]`` with 64 x D boxes; V over ``[B*H*S, D]`` or, transposed, ``[B*H*D, S]`` with D x 64)."""
    pid_m, bh, b, h, offs_m, row_ok = program_ids(H, S, BLOCK_M)
    offs_n = tl.arange(0, 64)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * S * HEAD_DIM
    q_ptrs = Q8 + base + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    if QK_INT8:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    # Per-row factor: the row's Q block scale times the softmax scale (log2 units).
    rowf = tl.load(SQ + bh * NB + offs_m // 64, mask=row_ok, other=1.0) * qk_scale
    cnt = tl.load(CNT + b * c_b + h * c_h + pid_m)
    idx_row = IDX + b * i_b + h * i_h + pid_m * i_r
    row0 = bh * S

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        kb = tl.load(idx_row + j)
        tok = kb * 64 + offs_n
        if TMA:
            k = K8.load([(row0 + kb * 64).to(tl.int32), 0])
        else:
            k = tl.load(K8 + base + tok.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :])
        s = tl.dot(q, tl.trans(k))
        if QK_INT8:
            s = s.to(tl.float32)  # exact int32 sums
        c = rowf * tl.load(SK + bh * NB + kb)
        if not FOLD:
            s = s * c[:, None]
        if PAD:
            nval = tl.load(BCNT + kb)
            if nval < 64:
                s = tl.where((offs_n < nval)[None, :], s, float("-inf"))
        if FOLD:
            # c > 0: the row max of the scaled scores is the scaled row max.
            m_new = tl.maximum(m_i, tl.max(s, 1) * c)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * c[:, None] - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8_PV:
            if TMA:
                v = tl.trans(V.load([(bh * HEAD_DIM).to(tl.int32), (kb * 64).to(tl.int32)]))
            else:
                v = tl.load(V + base + offs_d[None, :].to(tl.int64) * S + tok.to(tl.int64)[:, None])
            acc = acc * alpha[:, None] + tl.dot(_e4m3(p * 448.0, EXACT), v)
        else:
            if TMA:
                v = V.load([(row0 + kb * 64).to(tl.int32), 0])
            else:
                v = tl.load(V + base + tok.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if FP8_PV:
        sv = tl.load(SV + bh * HEAD_DIM + offs_d) * (1.0 / 448.0)
        out = out * sv[None, :] + tl.load(VM + bh * HEAD_DIM + offs_d)[None, :]
    out = tl.where(has[:, None], out, 0.0)
    tl.store(O + base + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


# ------------------------------------------------------------------------------------- launchers
def _bh(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0) if t.shape[0] != 1 else 0, t.stride(1) if t.shape[1] != 1 else 0)


def _stat_partials(x: torch.Tensor, block_counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    B, H, S, D = x.shape
    nb = S // BLOCK_TOKENS
    parts = [torch.empty(B * H, nb, D, dtype=torch.float32, device=x.device) for _ in range(3)]
    _stats[(nb, B * H)](x, *parts, block_counts, S, nb, HEAD_DIM=D, num_warps=4)
    return tuple(parts)


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_counts: torch.Tensor, *,
             fp8_pv: bool, qk_int8: bool = False) -> dict[str, torch.Tensor]:
    """The e4m3 operands and their scales for :func:`forward_quantized` (contiguous tiled q, k, v).

    Returns ``q8``, ``k8`` (e4m3 ``[B, H, S, D]``), ``sq``, ``sk`` (float32 ``[B*H, S // 64]``),
    ``k_mean`` (float32 ``[B*H, D]``), ``v`` (``v`` itself, or with ``fp8_pv`` e4m3 ``[B, H, D, S]``)
    and with ``fp8_pv`` also ``sv``, ``v_mean`` (float32 ``[B*H, D]``). ``qk_int8``: q8, k8 in int8
    (scale ``amax / 127``) instead of e4m3, the experimental variant SageAttention uses."""
    B, H, S, D = q.shape
    nb = S // BLOCK_TOKENS
    exact = interpreting()
    n_real = block_counts.sum().to(torch.float32)
    out: dict[str, torch.Tensor] = {}
    for name, x, smooth in (("q", q, False), ("k", k, True)):
        x8 = torch.empty(x.shape, dtype=torch.int8 if qk_int8 else FP8, device=x.device)
        sc = torch.empty(B * H, nb, dtype=torch.float32, device=x.device)
        mean = sc
        if smooth:
            mean = _stat_partials(x, block_counts)[0].sum(1) / n_real
            out[f"{name}_mean"] = mean
        _quant_blocks[(nb, B * H)](x, x8, sc, mean, block_counts, S, nb, HEAD_DIM=D, SMOOTH=smooth,
                                   EXACT=exact, INT8=qk_int8, num_warps=4)
        out[f"{name}8"], out[f"s{name}"] = x8, sc
    if not fp8_pv:
        out["v"] = v
        return out
    tot, mx, mn = _stat_partials(v, block_counts)
    mean = tot.sum(1) / n_real
    amax = torch.maximum(mx.amax(1) - mean, mean - mn.amin(1))
    sv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    vt8 = torch.empty(B, H, D, S, dtype=FP8, device=v.device)
    _quant_v_t[(nb, B * H)](v, vt8, sv, mean, block_counts, S, HEAD_DIM=D, EXACT=exact, num_warps=4)
    out.update(v=vt8, sv=sv, v_mean=mean)
    return out


def _descriptor(x: torch.Tensor, rows: int, box: list[int]) -> object:
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(x.view(rows, x.shape[-1]), box)


def forward_quantized(qz: dict[str, torch.Tensor], out_dtype: torch.dtype, counts: torch.Tensor,
                      indices: torch.Tensor, block_counts: torch.Tensor, scale: float, *, tile_m: int,
                      padded: bool, tma: bool, warps: int = 4, stages: int = 2) -> torch.Tensor:
    """The kernel alone on :func:`quantize`'s output (benchmarks time it separately)."""
    q8, k8, v = qz["q8"], qz["k8"], qz["v"]
    B, H, S, D = q8.shape
    fp8_pv = v.dtype == FP8
    o = torch.empty(B, H, S, D, dtype=out_dtype, device=q8.device)
    if tma:
        kk = _descriptor(k8, B * H * S, [BLOCK_TOKENS, D])
        vv = _descriptor(v, B * H * D, [D, BLOCK_TOKENS]) if fp8_pv else _descriptor(v, B * H * S, [BLOCK_TOKENS, D])
    else:
        kk, vv = k8, v
    sv = qz.get("sv", qz["sq"])
    vm = qz.get("v_mean", qz["sq"])
    _attn_fwd_fp8[(-(-S // tile_m), B * H)](
        q8, kk, vv, o, qz["sq"], qz["sk"], sv, vm, counts, indices, block_counts,
        *_bh(counts), *_bh(indices), indices.stride(2),
        H, S, S // BLOCK_TOKENS, scale * LOG2E,
        BLOCK_M=tile_m, HEAD_DIM=D, PAD=padded, FOLD=scale > 0, TMA=tma, FP8_PV=fp8_pv, EXACT=interpreting(),
        QK_INT8=q8.dtype == torch.int8,
        num_warps=warps if tile_m == 128 else 4, num_stages=stages,
    )  # fmt: skip
    return o


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
            block_counts: torch.Tensor, scale: float, *, tile_m: int, padded: bool, tma: bool,
            fp8_pv: bool = False, qk_int8: bool = False, warps: int = 4, stages: int = 2) -> torch.Tensor:
    """Output ``[B, H, S, D]`` (q's dtype) of tiled q, k, v in float16/bfloat16 with FP8 products.

    Arguments as :func:`nabla_attn.kernels.attention.forward`; ``fp8_pv``: P.V in e4m3 too;
    ``qk_int8``: Q.K^T in int8 instead of e4m3 (experimental, for comparison)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qz = quantize(q, k, v, block_counts, fp8_pv=fp8_pv, qk_int8=qk_int8)
    return forward_quantized(qz, q.dtype, counts, indices, block_counts, scale, tile_m=tile_m, padded=padded,
                             tma=tma, warps=warps, stages=stages)
