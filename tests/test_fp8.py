"""The FP8 forward (``precision="fp8"``, ``kernels/attention_fp8.py``) against float64, on the CPU
through Triton's interpreter, and its error paths.

What the interpreter can run (Triton 3.6): e4m3 tensors loaded from memory, e4m3 x e4m3 dots with
float32 accumulation, tensor descriptors over e4m3 tensors, bfloat16 stores. What it cannot: its
float32 -> e4m3 cast drops the carry when the mantissa rounds up to the next power of two (7.84 ->
4.0), so under the interpreter the kernels round on the e4m3 grid in float32 first (``EXACT``; the
same values as PyTorch's cast, tested below); and a bfloat16 dot (numpy has no bfloat16), so P.V in
the input dtype is tested with float16 inputs, and bfloat16 inputs with P.V in e4m3.

Accuracy rule (the one ``benchmarks/bench_fp8.py`` reports at full size on the H200): cosine
similarity to float64 >= 0.999 on the real rows, and max error <= ``ERR_FACTOR`` x the error of the
bf16 kernel's arithmetic on the same data (exact scores, probabilities rounded to bfloat16, float32
accumulation, bfloat16 output; emulated in PyTorch here because the interpreter has no bf16 dot).
"""

from __future__ import annotations

import math

import pytest
import torch

# Must come before anything imports Triton: it switches the CPU interpreter on (triton_interpret.py).
from triton_interpret import DEVICE, only_in_process, rerun_in_fresh_process

pytest.importorskip("triton")

from nabla_attn import TokenLayout, VideoGrid, nabla_attention, tile  # noqa: E402
from nabla_attn.backends.reference import reference_attention  # noqa: E402
from nabla_attn.backends.triton import attention_fp8, fp8_capable, fp8_unsupported  # noqa: E402
from nabla_attn.kernels import attention_fp8 as kernel  # noqa: E402
from nabla_attn.masks import BlockSparseMask  # noqa: E402

# 2 frames x 9x10 tokens (ragged 8x8 tiles: padding in every video block row) + 3 text tokens.
LAYOUT = TokenLayout(VideoGrid(2, 9, 10), 3)
WHOLE = TokenLayout(VideoGrid(2, 8, 16), 0)  # no padding slot
# e4m3 keeps 3 mantissa bits against bf16's 7 (16x coarser rounding); measured 10-19x here.
ERR_FACTOR = 32.0


def test_in_fresh_process_when_triton_was_imported_first() -> None:
    rerun_in_fresh_process(__file__)


_only_in_process = only_in_process  # autouse fixture, see triton_interpret.py


def _inputs(layout: TokenLayout, H: int, D: int, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Tiled q, k, v with per-channel offsets (what smoothing is for) and a low-frequency component."""
    g = torch.Generator().manual_seed(seed)
    S = layout.seq_len
    t = torch.linspace(0, 3, S)[:, None]
    out = []
    for off in (0.3, 2.0, 1.0):
        x = torch.randn(1, H, S, D, generator=g) + off * torch.randn(1, H, 1, D, generator=g)
        x = x + torch.sin(t * torch.randn(D, generator=g) * 4)
        out.append(tile(x.to(torch.bfloat16).float(), layout).to(DEVICE, dtype))  # bf16-representable values
    return out


def _mask(layout: TokenLayout, H: int, query_block: int, seed: int) -> BlockSparseMask:
    g = torch.Generator().manual_seed(seed)
    nq = -(-layout.num_blocks // (query_block // 64))
    kept = torch.rand(1, H, nq, layout.num_blocks, generator=g) < 0.5
    kept[0, 0, 1] = False  # an empty row: output exactly 0
    kept[..., 0, :] = True  # a full row (text block included)
    return BlockSparseMask(kept.to(DEVICE), layout, query_block)


def _bf16_kernel_emulation(q, k, v, mask: BlockSparseMask, scale: float):  # type: ignore[no-untyped-def]
    """The bf16 NABLA kernel's rounding: exact scores, p = exp(s - max) rounded to bf16, float32 sums."""
    lay = mask.layout
    rows = torch.arange(lay.tiled_len) // mask.query_block
    allowed = mask.kept[:, :, rows].repeat_interleave(64, -1) & lay.valid_tokens(DEVICE)
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e30)
    p = torch.exp(s - m).float()
    out = (p.bfloat16().float() @ v.float()) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(allowed.any(-1, keepdim=True), out, 0.0).bfloat16()


def _check(out: torch.Tensor, q, k, v, mask: BlockSparseMask, scale: float):  # type: ignore[no-untyped-def]
    ref = reference_attention(q.double(), k.double(), v.double(), mask, scale)
    emu = _bf16_kernel_emulation(q, k, v, mask, scale)
    valid = mask.layout.valid_tokens(DEVICE)
    o, r, e = (x.double()[..., valid, :] for x in (out, ref, emu))
    cos = float(torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), 0))
    err, err_bf16 = float((o - r).abs().max()), float((e - r).abs().max())
    assert torch.isfinite(out).all()
    assert cos >= 0.999, cos
    assert err_bf16 > 0 and err <= ERR_FACTOR * err_bf16, (err, err_bf16)
    return {"cos": cos, "err": err, "err_bf16": err_bf16}


CASES = {
    # name: (query_block, P.V in e4m3, dtype, TMA descriptors, Q.K^T in int8 (experimental))
    "q64_fp16_pv16": (64, False, torch.float16, False, False),
    "q128_fp16_pv16_tma": (128, False, torch.float16, True, False),
    "q64_bf16_pv8_tma": (64, True, torch.bfloat16, True, False),
    "q128_bf16_pv8": (128, True, torch.bfloat16, False, False),
    "q64_bf16_int8qk_pv8_tma": (64, True, torch.bfloat16, True, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64(name: str) -> None:
    query_block, pv8, dtype, tma, int8 = CASES[name]
    q, k, v = _inputs(LAYOUT, 1, 32, seed=len(name), dtype=dtype)
    mask = _mask(LAYOUT, 1, query_block, seed=3)
    lists = _lists(mask)
    out = kernel.forward(q, k, v, *lists, LAYOUT.block_counts(DEVICE), 1 / math.sqrt(32), tile_m=query_block,
                         padded=True, tma=tma, fp8_pv=pv8, qk_int8=int8)
    assert out.dtype == dtype and out.shape == q.shape
    _check(out, q, k, v, mask, 1 / math.sqrt(32))
    assert out[0, 0, query_block:2 * query_block].abs().max() == 0  # the empty row


def _lists(mask: BlockSparseMask) -> tuple[torch.Tensor, torch.Tensor]:
    from nabla_attn.kernels.mask_build import compact

    return compact(mask.kept)


@pytest.mark.parametrize("scale", [0.2, -0.15])
def test_whole_blocks_and_negative_scale(scale: float) -> None:
    """No padding slot (no validity mask in the kernel); a negative scale cannot fold into exp2."""
    q, k, v = _inputs(WHOLE, 1, 64, seed=5, dtype=torch.bfloat16)
    mask = _mask(WHOLE, 1, 64, seed=4)
    out = kernel.forward(q, k, v, *_lists(mask), WHOLE.block_counts(DEVICE), scale, tile_m=64, padded=False,
                         tma=False, fp8_pv=True)
    _check(out, q, k, v, mask, scale)


def test_public_op_text_tokens_and_query_block_128() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, LAYOUT.seq_len, 32, generator=g).to(DEVICE, torch.float16) for _ in range(3))
    out, mask = nabla_attention(q, k, v, LAYOUT.grid, 0.6, text_tokens=3, query_block=128, precision="fp8",
                                return_mask=True)
    assert out.shape == v.shape and out.dtype == v.dtype
    ref = nabla_attention(q.double(), k.double(), v.double(), LAYOUT.grid, mask=mask, text_tokens=3,
                          backend="reference")
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), 0)
    assert cos >= 0.999


def test_quantize_prepass() -> None:
    """The pre-pass against PyTorch: per-block scales, e4m3 bits, the smoothed K (padding rows 0),
    V per channel and transposed."""
    q, k, v = _inputs(LAYOUT, 2, 32, seed=9, dtype=torch.bfloat16)
    bc = LAYOUT.block_counts(DEVICE)
    z = kernel.quantize(q, k, v, bc, fp8_pv=True)
    B, H, S, D = q.shape
    nb = S // 64
    blocks = q.float().view(B * H, nb, 64, D)
    amax = blocks.abs().amax((2, 3))
    torch.testing.assert_close(z["sq"], amax / 448, rtol=1e-6, atol=0)
    want = (blocks * (448 / amax)[..., None, None]).to(kernel.FP8).view(B, H, S, D)
    assert torch.equal(z["q8"].float(), want.float())  # the values of PyTorch's cast
    valid = LAYOUT.valid_tokens(DEVICE)
    kmean = k.float()[..., valid, :].mean(2).view(B * H, D)
    torch.testing.assert_close(z["k_mean"], kmean, rtol=1e-5, atol=1e-5)
    ks = torch.where(valid[:, None], k.float() - kmean.view(B, H, 1, D), 0.0)
    kd = z["k8"].float() * z["sk"].view(B, H, nb, 1, 1).repeat_interleave(64, 2).view(B, H, S, 1)
    assert torch.all(kd[..., ~valid, :] == 0)
    assert float((kd - ks).abs().max()) <= float(ks.abs().max()) / 16  # e4m3: 3 mantissa bits
    vmean = v.float()[..., valid, :].mean(2).view(B * H, D)
    vs = (v.float() - vmean.view(B, H, 1, D))[..., valid, :]
    torch.testing.assert_close(z["sv"], vs.abs().amax(2).view(B * H, D) / 448, rtol=1e-5, atol=1e-6)
    assert z["v"].shape == (B, H, D, S)
    vd = z["v"].float().transpose(-1, -2) * z["sv"].view(B, H, 1, D)
    assert torch.all(vd[..., ~valid, :] == 0)
    assert float((vd[..., valid, :] - vs).abs().max()) <= float(vs.abs().max()) / 16


def test_quantize_gives_torch_bits() -> None:
    """The kernel's e4m3 cast (the interpreter's workaround on the CPU, the hardware cast on a GPU)
    gives PyTorch's values: values straddling every binade, subnormals and the saturation point."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * 30, torch.tensor([447.9, 448.0, 7.84, 3.97]),
                   torch.randn(4092, generator=g) * 1e-2]).view(1, 1, 128, 64).to(DEVICE)  # two 64x64 blocks
    z = kernel.quantize(x, x, x, torch.full((x.shape[2] // 64,), 64, dtype=torch.int32, device=DEVICE), fp8_pv=False)
    amax = x.view(-1, 64, 64).abs().amax((1, 2))
    want = (x.view(-1, 64, 64) * (448 / amax)[:, None, None]).to(kernel.FP8)
    # Equal values (tiny negatives may round to +0 where PyTorch gives -0).
    assert torch.equal(z["q8"].view(-1, 64, 64).float(), want.float())


# ------------------------------------------------------------------------------------- error paths
def _qkv(dtype: torch.dtype = torch.float16, D: int = 32) -> list[torch.Tensor]:
    return [torch.randn(1, 1, LAYOUT.seq_len, D, dtype=dtype, device=DEVICE) for _ in range(3)]


def test_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision must be one of .*'fp16'"):
        nabla_attention(*_qkv(), LAYOUT.grid, text_tokens=3, precision="fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_rejects_other_backends(backend: str) -> None:
    with pytest.raises(ValueError, match=f"backend='triton' only, not backend='{backend}'"):
        nabla_attention(*_qkv(), LAYOUT.grid, text_tokens=3, precision="fp8", backend=backend)  # type: ignore[arg-type]


def test_rejects_float32_head_dim_and_grad() -> None:
    with pytest.raises(ValueError, match="precision='fp8' cannot run dtype torch.float32"):
        nabla_attention(*_qkv(torch.float32), LAYOUT.grid, text_tokens=3, precision="fp8")
    with pytest.raises(ValueError, match="head_dim 16"):
        nabla_attention(*_qkv(D=16), LAYOUT.grid, text_tokens=3, precision="fp8")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="forward only"):
        nabla_attention(q, k.requires_grad_(), v, LAYOUT.grid, text_tokens=3, precision="fp8")
    with torch.no_grad():  # no backward follows: allowed
        nabla_attention(q, k, v, LAYOUT.grid, text_tokens=3, precision="fp8", query_block=128)


def test_rejects_cpu_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from nabla_attn.backends import fused

    monkeypatch.setattr(fused, "interpreting", lambda: False)
    cpu = [x.cpu() for x in _qkv()]  # on a GPU machine too
    with pytest.raises(ValueError, match="tensors on cpu .fp8 needs CUDA"):
        nabla_attention(*cpu, LAYOUT.grid, text_tokens=3, precision="fp8")
    assert "tensors on cpu" in str(fp8_unsupported(*cpu))


def test_capability_rule() -> None:
    assert not fp8_capable((8, 0)) and not fp8_capable((8, 6))
    assert fp8_capable((8, 9)) and fp8_capable((9, 0)) and fp8_capable((10, 0))


def test_attention_fp8_builds_lists_for_a_given_mask() -> None:
    q, k, v = _inputs(LAYOUT, 1, 32, seed=2, dtype=torch.bfloat16)
    mask = _mask(LAYOUT, 1, 64, seed=1)
    out = attention_fp8(q, k, v, mask, None, 0.2, fp8_pv=True)
    _check(out, q, k, v, mask, 0.2)


def test_nabla_config_precision() -> None:
    pytest.importorskip("diffusers")
    from nabla_attn.diffusers import NablaConfig

    assert NablaConfig().precision == "bf16" and NablaConfig(precision="fp8").precision == "fp8"
    with pytest.raises(ValueError, match="precision must be one of"):
        NablaConfig(precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision='fp8' runs on backend='triton' only, not backend='flex'"):
        NablaConfig(precision="fp8", backend="flex")
