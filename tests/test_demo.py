"""The bundled video DiT and ``nabla demo`` (CPU, small sizes)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from nabla_attn import TokenLayout, VideoGrid  # noqa: E402
from nabla_attn.demo import cli as demo_cli  # noqa: E402
from nabla_attn.demo.metrics import psnr, ssim  # noqa: E402
from nabla_attn.demo.model import (  # noqa: E402
    CLASS_NAMES,
    MaskPolicy,
    TinyWanConfig,
    flow_timesteps,
    load_bundled,
    random_block_mask,
    sample,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_bundled()


def test_bundled_weights_load_with_expected_shapes(model) -> None:
    cfg = model.config
    assert isinstance(cfg, TinyWanConfig)
    assert cfg.class_names == CLASS_NAMES
    assert cfg.trained.get("steps", 0) > 0, "the bundled config should record its training run"
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    assert model.transformer.patch_embedding.weight.shape == (inner, 3, *cfg.patch_size)
    assert model.class_embedding.weight.shape == (cfg.num_classes, cfg.class_tokens * cfg.text_dim)
    assert len(model.transformer.blocks) == cfg.num_layers
    # Trained weights, not an initialisation: the class embeddings differ from each other.
    e = model.class_embedding.weight
    assert (e[0] - e[1]).abs().max() > 1e-3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_forward_shape_and_finite(model) -> None:
    x = torch.randn(2, 3, 3, 16, 24)
    out = model(x, torch.tensor([0.3, 0.9]), torch.tensor([0, 2]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "policy",
    [None, MaskPolicy("nabla", threshold=0.7), MaskPolicy("nabla+sta", threshold=0.5, sta_window=(1, 3, 3), query_block=128)],
    ids=["dense", "nabla", "nabla+sta-q128"],
)
def test_tiny_generation_is_finite_and_records_density(model, policy) -> None:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 3, 3, 32, 48, generator=gen)  # grid 3 x 16 x 24: 2 x 3 tiles per frame
    model.set_attention(policy)
    model.reset_stats()
    try:
        video = sample(model, noise, torch.tensor([1]), steps=2)
    finally:
        model.set_attention(None)
    assert video.shape == noise.shape
    assert torch.isfinite(video).all()
    assert video.min() >= -1 and video.max() <= 1
    stats = [p.stats for p in model.processors]
    if policy is None:
        assert all(not s for s in stats)
    else:
        assert all(len(s) == 2 for s in stats)  # one record per step per layer
        assert all(0 < st.density <= 1 for s in stats for st in s)


def test_threshold_one_equals_dense(model) -> None:
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 3, 2, 16, 32, generator=gen)
    dense = sample(model, noise, torch.tensor([0]), steps=2)
    model.set_attention(MaskPolicy("nabla", threshold=1.0))
    try:
        full = sample(model, noise, torch.tensor([0]), steps=2)
    finally:
        model.set_attention(None)
    torch.testing.assert_close(full, dense, atol=2e-4, rtol=0)


def test_random_block_mask_density_and_determinism() -> None:
    layout = TokenLayout(VideoGrid(4, 32, 48))
    a = random_block_mask(layout, 4, 0.2, seed=7)
    b = random_block_mask(layout, 4, 0.2, seed=7)
    assert torch.equal(a.kept, b.kept)
    assert abs(a.density - 0.2) < 0.03
    assert a.kept[0, :, torch.arange(layout.num_blocks), torch.arange(layout.num_blocks)].all()


def test_psnr_known_values() -> None:
    x = torch.zeros(3, 4, 8, 8, dtype=torch.float64)
    assert psnr(x, x) == math.inf
    # A constant offset c on range 2: PSNR = 10 log10(4 / c^2).
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-9)
    assert psnr(x, x + 0.5, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.25), rel=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:1])


def test_ssim_known_values() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 20, 20, generator=gen) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # Two constant images a, b: variances vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2.
    a, b, c1 = 0.2, -0.3, (0.01 * 2.0) ** 2
    expect = (2 * a * b + c1) / (a * a + b * b + c1)
    const = lambda v: torch.full((16, 16), v, dtype=torch.float64)  # noqa: E731
    assert ssim(const(a), const(b)) == pytest.approx(expect, rel=1e-9)
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)  # symmetric
    noisy = [ssim(x, (x + s * torch.randn(x.shape, generator=gen)).clamp(-1, 1)) for s in (0.05, 0.2, 0.8)]
    assert noisy[0] > noisy[1] > noisy[2]


def test_flow_timesteps() -> None:
    t = flow_timesteps(4, shift=2.0)
    assert t[0] == 1.0 and t[-1] == 0.0
    assert all(a > b for a, b in zip(t, t[1:]))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow_timesteps(0)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo_cli.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "huge"], "--size must be one of small, large, got 'huge'"),
        (["--clip", "cats"], "--clip must be one of bigbuckbunny, bikes, carphone, got 'cats'"),
        (["--threshold", "0"], "--threshold must be in (0, 1], got 0.0"),
        (["--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
        (["--sta-window", "2,3,3"], "--sta-window must be three positive odd integers"),
        (["--sta-window", "a,b"], "--sta-window must be three odd integers"),
        (["--query-block", "96"], "--query-block must be 64 or 128, got 96"),
        (["--steps", "0"], "--steps must be in 1..1000, got 0"),
        (["--steps", "4", "--dense-steps", "5"], "--dense-steps must be in 0..4"),
        (["--format", "avi"], "--format must be mp4 or gif, got 'avi'"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--weights", "/no/such/file.safetensors"], "no such file"),
    ],
)
def test_demo_bad_options_give_clear_errors(argv: list[str], message: str, capsys) -> None:
    assert demo_cli.run(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert "nabla demo: error:" in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_demo_cuda_without_gpu_is_a_clear_error(capsys) -> None:
    assert demo_cli.run(_parse(["--device", "cuda"])) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_end_to_end_one_step(tmp_path, capsys) -> None:
    pytest.importorskip("av")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    args = _parse(["--steps", "1", "--out", str(out), "--no-progress", "--format", "gif", "--clip", "carphone"])
    assert demo_cli.run(args) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM" in text and "kept density per layer" in text and str(out.resolve()) in text
    for name in ("dense_vs_nabla.gif", "block_masks.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["density_per_layer"]) == 5
    assert 0 < summary["density"] < 1
