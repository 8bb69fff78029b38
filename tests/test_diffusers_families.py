"""Every supported diffusers family against an independent oracle below threshold 1 (the unpatched
model with ``nabla_attention`` at diffusers' own dispatch point, grid and text layout derived in the
test: see diffusers_oracle.py), the newer families against dense at threshold 1, and the
family-specific paths: Kandinsky's fractal order and config mapping (its tables against diffusers'
``nablaT_v2``), LTX-2's appended tokens, coordinate-only calls and guidance blocks, Wan 2.2 TI2V's
per-token timesteps."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))

from diffusers_models import FACTORIES, run  # noqa: E402
from diffusers_oracle import Layout, expected_layout, oracle  # noqa: E402

from nabla_attn import VideoGrid, nabla_mask  # noqa: E402
from nabla_attn.diffusers import SUPPORTED_MODELS, NablaConfig, apply_nabla, remove_nabla  # noqa: E402

FAMILIES = sorted(FACTORIES)
LAYERS = {"wan_vace": 4}  # self-attention layers per tiny model; 2 elsewhere
NEW = ["wan_vace", "wan_animate", "chronoedit", "skyreels_v2", "hunyuan_video15", "consisid", "ltx2", "kandinsky5",
       "kandinsky6_sr"]  # fmt: skip


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def dense_context(family: str) -> contextlib.AbstractContextManager:
    """Where the unpatched model runs dense. Kandinsky 5's own NABLA mask (a flex BlockMask) cannot run
    on SDPA: without it (``nablaT_v2`` gives no mask) the same fractal-order forward is dense."""
    if family != "kandinsky5":
        return contextlib.nullcontext()
    return mock.patch("diffusers.models.transformers.transformer_kandinsky.nablaT_v2", lambda *args, **kwargs: None)


def dense_run(family: str, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with dense_context(family):
        return run(model, inputs)


def check_oracle(family: str, model: torch.nn.Module, inputs: dict, config: NablaConfig) -> None:
    """The model with ``config`` applied equals the oracle on the same inputs, and is really sparse."""
    lay = expected_layout(family, model, inputs)
    with torch.no_grad():
        with oracle(family, lay, config.threshold, config.sta_window) as calls:
            expected = run(model, inputs)
        handle = apply_nabla(model, config)
        got = run(model, inputs)
        stats = handle.stats()
        remove_nabla(handle)
        dense = dense_run(family, model, inputs)
    assert len(calls) == LAYERS.get(family, 2), f"{family}: the oracle replaced {len(calls)} attention calls"
    assert _close(got, expected), f"{family}: max diff to the oracle {(got - expected).abs().max():.3g}"
    assert (got - dense).abs().max() > 1e-4, f"{family}: the sparse output equals dense: the oracle test has no teeth"
    assert len(stats.last) == LAYERS.get(family, 2) and all(0.05 < d < 0.95 for d in stats.last.values()), stats.last


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_below_threshold_one(family: str) -> None:
    # batch 2 (HunyuanVideo 1.0/1.5: the second prompt shorter); odd grids (3 x 10 x 18 tokens: edge
    # tiles with padding) except Kandinsky's fractal order, which needs whole tiles (2 x 16 x 24).
    model, inputs = FACTORIES[family](batch=2)
    config = NablaConfig(threshold=0.5, backend="reference")
    if family.startswith("kandinsky"):
        config = NablaConfig.from_model(model, backend="reference")  # the checkpoint's own P and STA window
    check_oracle(family, model, inputs, config)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "kandinsky5"])
def test_oracle_with_sta_and_other_grid(family: str) -> None:
    # Kandinsky 5: the I2V model (visual_cond), 3 frames of 1 x 4 tiles
    kwargs = dict(frames=2, height=9, width=13) if family != "kandinsky5" else dict(frames=3, height=8, width=32, visual_cond=True)
    model, inputs = FACTORIES[family](batch=1, **kwargs)
    check_oracle(family, model, inputs, NablaConfig(threshold=0.4, sta_window=(1, 1, 3), backend="reference"))


@pytest.mark.parametrize("family", NEW)
def test_threshold_one_matches_dense_and_remove_is_exact(family: str) -> None:
    model, inputs = FACTORIES[family](batch=2)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        dense = dense_run(family, model, inputs)
        handle = apply_nabla(model, NablaConfig(threshold=1.0))
        nabla = run(model, inputs)
        stats = handle.stats()
        remove_nabla(model)
        restored = dense_run(family, model, inputs)
    assert _close(nabla, dense), f"{family}: max diff {(nabla - dense).abs().max():.3g}"
    assert len(stats.last) == LAYERS.get(family, 2) and all(d == 1.0 for d in stats.last.values())
    assert torch.equal(restored, dense)
    assert all(m.processor is processors[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("family", ["hunyuan_video15", "ltx2", "kandinsky5"])
def test_backward_with_gradient_checkpointing(family: str) -> None:
    """The processors written for these families (the others reuse Wan's and CogVideoX's, tested in
    test_diffusers.py): parameter gradients at threshold 1 equal the dense model's."""
    model, inputs = FACTORIES[family]()
    model.train()
    model.enable_gradient_checkpointing()

    def grads() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        run(model, inputs).square().mean().backward()  # checkpointing recomputes inside backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    with dense_context(family):
        dense = grads()
    handle = apply_nabla(model, NablaConfig(threshold=1.0))
    nabla = grads()
    assert handle.stats().last
    remove_nabla(handle)
    assert nabla.shape == dense.shape and (nabla - dense).norm() <= 1e-5 * dense.norm()


def test_supported_models_match_the_families() -> None:
    from nabla_attn.diffusers import _families

    assert sorted(f.model_class.__name__ for f in _families()) == sorted(SUPPORTED_MODELS)


# ----------------------------------------------------------------------------------- Kandinsky
def _fractal(x: torch.Tensor, grid: VideoGrid) -> torch.Tensor:
    """``[B, S, H, D]`` natural -> Kandinsky's fractal order, with diffusers' own function."""
    from diffusers.models.transformers.transformer_kandinsky import local_patching

    shape = (x.shape[0], grid.frames, grid.height, grid.width)
    return local_patching(x.view(*shape, *x.shape[2:]), shape, (1, 8, 8), dim=1).flatten(1, 2)


@pytest.mark.parametrize("window", [None, (3, 1, 2), (1, 3, 3)])
@pytest.mark.parametrize("P", [0.5, 0.8])
def test_kandinsky_tables_equal_nablaT_v2(P: float, window: tuple[int, int, int] | None) -> None:
    """Same fractal-order q, k: our float32 table == diffusers' ``nablaT_v2`` table, bit for bit, with the
    threshold and STA window that ``NablaConfig.from_model`` maps from the checkpoint config (even
    window sizes included) and the STA mask Kandinsky's pipeline builds."""
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

    grid = VideoGrid(3, 24, 32)
    model, _ = FACTORIES["kandinsky5"](P=P, window=window or (1, 1, 1))
    config = NablaConfig.from_model(model)
    sta_window = config.sta_window if window else None
    torch.manual_seed(int(P * 10))
    B, H, D = 2, 3, 16
    # per-block offsets so block means differ (near-uniform maps would keep everything)
    bias = torch.randn(B, 3, 3, 1, 4, 1, H, D).expand(B, 3, 3, 8, 4, 8, H, D).reshape(B, grid.num_tokens, H, D)
    q, k = (torch.randn(B, grid.num_tokens, H, D) + bias for _ in range(2))
    qf, kf = _fractal(q, grid), _fractal(k, grid)
    if window:
        sta = Kandinsky5T2VPipeline.fast_sta_nabla(3, 3, 4, *window, device="cpu")[None, None]
    else:
        sta = torch.zeros(1, 1, grid.num_blocks, grid.num_blocks, dtype=torch.bool)
    theirs = nablaT_v2(qf, kf, sta, thr=P).to_dense().bool()
    ours = nabla_mask(qf.transpose(1, 2), kf.transpose(1, 2), grid, config.threshold, sta_window, token_order="tiled",
                      backend="reference").dense()  # fmt: skip
    assert 0.05 < theirs.float().mean() < 0.95  # a real selection, not all or nothing
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} block pairs differ"


def test_kandinsky_config_mapping_and_default() -> None:
    model, inputs = FACTORIES["kandinsky5"](P=0.7, window=(11, 2, 4))
    assert NablaConfig.from_model(model) == NablaConfig(threshold=0.7, sta_window=(11, 3, 5), query_block=64)
    assert NablaConfig.from_model(model, threshold=0.5, dense_steps=2).dense_steps == 2
    handle = apply_nabla(model)  # no config: the checkpoint's own settings
    assert handle.config.threshold == 0.7 and handle.config.sta_window == (11, 3, 5)
    remove_nabla(handle)
    from diffusers import Kandinsky5Transformer3DModel

    regular = Kandinsky5Transformer3DModel(**{**model.config, "attention_type": "regular"})
    with pytest.raises(ValueError, match="defines no NABLA settings"):
        NablaConfig.from_model(regular)
    assert apply_nabla(regular).config == NablaConfig()  # nothing to map: the usual defaults
    remove_nabla(regular)
    sr, _ = FACTORIES["kandinsky6_sr"]()
    assert NablaConfig.from_model(sr) == NablaConfig(threshold=0.6, sta_window=(1, 1, 3))


def test_kandinsky_natural_order_on_an_odd_grid_and_fractal_errors() -> None:
    # Without sparse_params (regular attention) tokens are natural: NABLA tiles per layer, any grid.
    model, inputs = FACTORIES["kandinsky5"](batch=2, frames=3, height=10, width=18, fractal=False)
    check_oracle("kandinsky5", model, inputs, NablaConfig(threshold=0.5, backend="reference"))
    _, fractal_inputs = FACTORIES["kandinsky5"](frames=2, height=16, width=24)
    bad = {**inputs, "sparse_params": {**fractal_inputs["sparse_params"], "to_fractal": True}}
    apply_nabla(model, NablaConfig(threshold=0.5))
    with pytest.raises(ValueError, match="multiples of 8"):
        run(model, bad)
    remove_nabla(model)


def test_kandinsky_dense_steps_run_without_the_block_mask() -> None:
    # The unpatched model cannot run its sparse_params on SDPA; with NABLA, dense steps drop the BlockMask.
    model, inputs = FACTORIES["kandinsky5"]()
    with torch.no_grad():
        dense = dense_run("kandinsky5", model, inputs)
        handle = apply_nabla(model, NablaConfig.from_model(model, dense_steps=1))
        first = run(model, inputs)
        assert handle.step == 0 and not handle.stats().last
        remove_nabla(handle)
    assert torch.equal(first, dense)


# ----------------------------------------------------------------------------------------- LTX-2
def test_ltx2_appended_tokens_are_fully_attended() -> None:
    """Keyframe / reference tokens the condition pipelines append after the video tokens (N > F*H*W,
    coordinates passed explicitly) are fully attended, like text."""
    model, inputs = FACTORIES["ltx2"](batch=2)
    extra = 7
    coords = model.rope.prepare_video_coords(2, inputs["num_frames"], inputs["height"], inputs["width"], torch.device("cpu"))
    inputs = {
        **inputs,
        "hidden_states": torch.cat([inputs["hidden_states"], torch.randn(2, extra, 8)], dim=1),
        "timestep": torch.full((2, inputs["hidden_states"].shape[1] + extra), 500.0),
        "video_coords": torch.cat([coords, coords[:, :, :extra]], dim=2),
    }
    assert expected_layout("ltx2", model, inputs).text == extra
    check_oracle("ltx2", model, inputs, NablaConfig(threshold=0.5, backend="reference"))


def test_ltx2_without_grid_runs_dense_and_guidance_blocks_stay_dense(caplog: pytest.LogCaptureFixture) -> None:
    model, inputs = FACTORIES["ltx2"]()
    coords = model.rope.prepare_video_coords(1, inputs["num_frames"], inputs["height"], inputs["width"], torch.device("cpu"))
    coords_only = {k: v for k, v in inputs.items() if k not in ("num_frames", "height", "width")}
    coords_only["video_coords"] = coords
    with torch.no_grad():
        dense = run(model, coords_only)
        handle = apply_nabla(model, NablaConfig(threshold=0.5))
        with caplog.at_level("WARNING", logger="nabla_attn.diffusers"):
            out = run(model, coords_only)
        assert torch.equal(out, dense) and not handle.stats().last
        assert "without num_frames/height/width" in caplog.text
        remove_nabla(handle)

    from diffusers import LTX2VideoTransformer3DModel

    stg = LTX2VideoTransformer3DModel(**{**model.config, "perturbed_attn": True}).eval()
    stg_inputs = {**inputs, "spatio_temporal_guidance_blocks": [0], "perturbation_mask": torch.tensor([1.0])}
    with torch.no_grad():
        dense = run(stg, stg_inputs)
        handle = apply_nabla(stg, NablaConfig(threshold=1.0))
        out = run(stg, stg_inputs)
        # block 0 perturbed (spatio-temporal guidance): its original processor; block 1 sparse
        assert list(handle.stats().last) == ["transformer_blocks.1.attn1"]
        remove_nabla(handle)
    assert _close(out, dense)


# ------------------------------------------------------------------------------------- Wan 2.2
def test_wan22_ti2v_per_token_timesteps_oracle() -> None:
    """Wan 2.2 TI2V 5B is a ``WanTransformer3DModel`` (``expand_timesteps``): per-token timesteps, 0 on
    the conditioning frame, give per-token modulation ([B, S, 6, C]); both tilings against the oracle."""
    for tiling in ("layer", "forward"):
        model, inputs = FACTORIES["wan"](batch=2)
        ts = torch.full((2, 540), 700)
        ts[:, :180] = 0  # first latent frame: the conditioning image
        inputs["timestep"] = ts
        check_oracle("wan", model, inputs, NablaConfig(threshold=0.5, backend="reference", tiling=tiling))


def test_oracle_layout_is_independent_of_our_state() -> None:
    # The oracle's layout comes from shapes and config, e.g. CogVideoX text first, HunyuanVideo 1.5 per-sample.
    model, inputs = FACTORIES["hunyuan_video15"](batch=2)
    lay = expected_layout("hunyuan_video15", model, inputs)
    assert lay == Layout(VideoGrid(3, 10, 18), 20, "end", valid=(540 + 12 + 3, 540 + 7 + 2), pad_rows="zero")
    model, inputs = FACTORIES["cogvideox"]()
    assert expected_layout("cogvideox", model, inputs) == Layout(VideoGrid(3, 10, 18), 12, "start")
