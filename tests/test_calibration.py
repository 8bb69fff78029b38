"""nabla_attn.calibrate, per-layer thresholds and calibration files (CPU, tiny random diffusers Wan
model from tests/diffusers_models.py): the one-pass error measurement equals nabla_attention, the
knapsack solver equals brute force, a calibrated model lands near its target density, files
round-trip, per-layer thresholds reach the layers, bad inputs give clear errors."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))

from diffusers_models import run, wan  # noqa: E402

import nabla_attn  # noqa: E402
from nabla_attn import MaskSpec, TokenLayout, VideoGrid, nabla_attention, nabla_mask  # noqa: E402
from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla  # noqa: E402
from nabla_attn.diffusers._calibmeasure import candidate_errors  # noqa: E402
from nabla_attn.diffusers._calibsolve import evaluate, solve  # noqa: E402
from nabla_attn.diffusers._perhead import HeadSpec, head_attention  # noqa: E402
from nabla_attn.diffusers.calibration import Calibration, calibrate  # noqa: E402

TIMES = (900, 700, 500, 300)


@pytest.mark.parametrize("text, position, query_block", [(0, "end", 64), (7, "end", 128), (5, "start", 64)])
def test_one_pass_errors_equal_nabla_attention(text: int, position: str, query_block: int) -> None:
    grid = VideoGrid(2, 9, 13)  # edge tiles with padding
    layout = TokenLayout(grid, text, position)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 16) * 2 for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    masks, want = [], []
    for thr in (0.2, 0.6, 0.95):
        mask = nabla_mask(q, k, grid, thr, None, text, position, query_block=query_block)
        out = nabla_attention(q, k, v, grid, text_tokens=text, text_position=position, mask=mask)
        masks.append(mask)
        want.append((out - dense).double().square().sum(dim=(0, 2, 3)))
    err2, ref2 = candidate_errors(q, k, v, layout, masks, "natural", chunk_bytes=1 << 16)  # several chunks
    torch.testing.assert_close(err2, torch.stack(want), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref2, dense.double().square().sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-3)


def test_solver_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    L, S, C = 4, 5, 6
    thr = torch.linspace(0.1, 0.95, C)
    den = (thr**2)[None, None] * (1 + 0.5 * torch.rand(L, 1, 1, generator=gen)) * (1 + 0.2 * torch.rand(L, S, 1, generator=gen))
    err = (1 - thr)[None, None] * (0.2 + torch.rand(L, S, 1, generator=gen))
    for target in (0.15, 0.3, 0.5):
        got = solve(err, den, density=target, max_dense_steps=2)
        best = None
        for ds in range(3):
            for opts in itertools.product(range(-1, C), repeat=L):
                c = evaluate(err, den, list(opts), ds)
                if c.density <= target and (best is None or c.error < best.error):
                    best = c
        assert got.density <= target + 1e-9
        assert got.error == pytest.approx(best.error, abs=1e-4), (got, best)
    at_error = solve(err, den, error=0.2, max_dense_steps=2)
    assert at_error.error <= 0.2 + 1e-9
    with pytest.raises(ValueError, match="no candidate reaches mean density"):
        solve(err, den, density=0.001)


def _sampler(model, inputs):
    def go() -> None:
        for t in TIMES:
            run(model, dict(inputs, timestep=torch.full((inputs["hidden_states"].shape[0],), t)))

    return go


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    model, inputs = wan(batch=2)
    out = tmp_path_factory.mktemp("cal") / "cal.json"
    cal = calibrate(model, [_sampler(model, inputs)], density=0.45, thresholds=(0.2, 0.4, 0.6, 0.8, 0.95),
                    max_dense_steps=1, per_head=False, out=out, plot=out.with_suffix(".png"), progress=False)
    return model, inputs, cal, out


def test_calibration_lands_near_target_density(calibrated) -> None:
    model, inputs, cal, path = calibrated
    assert cal.choice.density <= 0.45 + 1e-9
    assert cal.choice.density > 0.3  # the budget is used, not wasted
    assert cal.choice.error <= cal.info["global"]["error"] + 1e-9  # never worse than one global threshold
    # Applied for real (its own, sparse trajectory): the mean kept fraction over every (layer, step),
    # dense layers and steps counted as 1, is close to the target.
    config = NablaConfig.from_calibration(path)
    handle = apply_nabla(model, config)
    per_step = []
    try:
        with torch.no_grad():
            for t in TIMES:
                handle.reset_stats()
                run(model, dict(inputs, timestep=torch.full((2,), t)))
                last = handle.stats().last
                per_step.append([last.get(f"blocks.{i}.attn1", 1.0) for i in range(2)])
    finally:
        remove_nabla(handle)
    for i in range(config.dense_steps):
        per_step[i] = [1.0, 1.0]
    actual = sum(map(sum, per_step)) / (2 * len(TIMES))
    assert abs(actual - cal.choice.density) < 0.1, (actual, cal.choice)
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_calibration_file_round_trips(calibrated) -> None:
    _, _, cal, path = calibrated
    data = json.loads(path.read_text())
    assert data["format"] == "nabla-calibration/1" and data["layers"] == ["blocks.0.attn1", "blocks.1.attn1"]
    config = NablaConfig.from_calibration(path)
    assert config == cal.config()
    assert config.dense_steps == cal.choice.dense_steps
    chosen = {name: value for name, value in data["choice"]["layer_thresholds"].items() if value is not None}
    assert {k: s.threshold for k, s in config.layer_thresholds} == chosen
    # A loaded file re-solves to the same choice, and for other targets without running the model.
    again = Calibration.load(path)
    assert (again.choice.options, again.choice.dense_steps) == (cal.choice.options, cal.choice.dense_steps)
    assert again.choice.density == pytest.approx(cal.choice.density, rel=1e-4)  # the file keeps 5 digits
    sparser = again.choose(density=0.3)
    assert sparser.choice.density <= 0.3 + 1e-9 and sparser.choice.error >= cal.choice.error
    assert NablaConfig.from_calibration(json.loads(path.read_text())) == config  # parsed JSON too
    # Per-head thresholds from the same measurements: never worse, and they reach the config.
    heads = again.choose(density=0.45, per_head=True)
    assert heads.head_options is not None and heads.chosen["density"] <= 0.45 + 1e-9
    assert heads.chosen["error"] <= cal.choice.error + 1e-9
    per_head = heads.config().layer_thresholds
    assert all(isinstance(spec, HeadSpec) and len(spec.thresholds) == 2 for _, spec in per_head)
    # The package root exposes calibrate lazily.
    assert nabla_attn.calibrate is calibrate


def test_per_layer_thresholds_reach_the_layers() -> None:
    model, inputs = wan(batch=1)
    with torch.no_grad():
        handle = apply_nabla(model, NablaConfig(threshold=0.7, layer_thresholds={0: 0.15, "blocks.1.attn1": 0.95}))
        run(model, inputs)
        per_layer = handle.stats().last
        remove_nabla(handle)
        handle = apply_nabla(model, NablaConfig(threshold=0.15))
        run(model, inputs)
        uniform = handle.stats().last
        remove_nabla(handle)
        handle = apply_nabla(model, NablaConfig(threshold=0.3, layer_thresholds={1: None}))
        run(model, inputs)
        one_dense = handle.stats().last
        remove_nabla(handle)
    assert per_layer["blocks.0.attn1"] == pytest.approx(uniform["blocks.0.attn1"])
    assert per_layer["blocks.1.attn1"] > per_layer["blocks.0.attn1"] + 0.2
    assert list(one_dense) == ["blocks.0.attn1"]  # the dense layer keeps the model's own processor


def test_nabla_config_stays_backward_compatible() -> None:
    c = NablaConfig(0.5, (1, 3, 3), 2)
    assert (c.threshold, c.sta_window, c.dense_steps, c.layer_thresholds, c.mask_reuse_steps) == (0.5, (1, 3, 3), 2, (), 1)
    with pytest.raises(Exception):
        c.threshold = 0.1  # type: ignore[misc]
    hash(NablaConfig(layer_thresholds={0: 0.3, 1: MaskSpec(0.5, (1, 3, 3))}))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "exactly one target"),
        (dict(density=0.2, error=0.1), ValueError, "exactly one target"),
        (dict(density=1.5), ValueError, "density is a kept fraction in \\(0, 1\\]"),
        (dict(error=-1.0), ValueError, "error must be a number > 0"),
        (dict(density=0.2, thresholds=(0.5, 1.5)), ValueError, "threshold must be a number in \\(0, 1\\]"),
        (dict(density=0.2, thresholds=()), ValueError, "thresholds is empty"),
        (dict(density=0.2, sta_window=(2, 3, 3)), ValueError, "sta_window must be three positive odd integers"),
        (dict(density=0.2, max_dense_steps=-1), ValueError, "max_dense_steps must be an integer >= 0"),
        (dict(density=0.2, query_stride=0), ValueError, "query_stride must be an integer >= 1"),
    ],
)
def test_calibrate_bad_arguments(kwargs, error, message) -> None:
    model, inputs = wan()
    with pytest.raises(error, match=message):
        calibrate(model, [inputs], progress=False, **kwargs)


def test_calibrate_bad_inputs_and_models() -> None:
    model, inputs = wan()
    with pytest.raises(ValueError, match="inputs is empty"):
        calibrate(model, [], density=0.3, progress=False)
    with pytest.raises(TypeError, match="inputs\\[0\\] is a int"):
        calibrate(model, [3], density=0.3, progress=False)
    with pytest.raises(RuntimeError, match="ran no NABLA-patched self-attention"):
        calibrate(model, [lambda: None], density=0.3, progress=False)
    with pytest.raises(TypeError, match="takes a diffusers pipeline or transformer"):
        calibrate(torch.nn.Linear(2, 2), [inputs], density=0.3, progress=False)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)  # removed after errors


def test_layer_thresholds_and_files_bad_values(tmp_path) -> None:
    model, inputs = wan()
    with pytest.raises(ValueError, match="index 5 is out of range 0..1"):
        apply_nabla(model, NablaConfig(layer_thresholds={5: 0.3}))
    with pytest.raises(ValueError, match="'blocks.9' matches no layer"):
        apply_nabla(model, NablaConfig(layer_thresholds={"blocks.9": 0.3}))
    with pytest.raises(ValueError, match="both excluded"):
        apply_nabla(model, NablaConfig(exclude_layers=(0,), layer_thresholds={"blocks.0.attn1": 0.3}))
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    with pytest.raises(ValueError, match="layer_thresholds\\[0\\]: threshold must be a number"):
        NablaConfig(layer_thresholds={0: 1.5})
    with pytest.raises(ValueError, match="names layer 0 twice"):
        NablaConfig(layer_thresholds=[(0, 0.3), (0, 0.4)])
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        NablaConfig.from_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        NablaConfig.from_calibration(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a NABLA calibration file"):
        NablaConfig.from_calibration(bad)
    bad.write_text(json.dumps({"format": "nabla-calibration/1", "choice": {}}))
    with pytest.raises(ValueError, match="malformed calibration file"):
        NablaConfig.from_calibration(bad)


@pytest.mark.parametrize("per_head", [False, True], ids=["per-layer", "per-head"])
def test_per_layer_thresholds_under_torch_compile_no_recompiles(per_head: bool) -> None:
    """Per-layer specs trace with no graph break; per-head ones assemble their table eagerly (a graph
    break per such layer, docs/calibration.md). Neither recompiles across steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = wan()
    handle = apply_nabla(model, NablaConfig(threshold=0.5, layer_thresholds={0: [0.2, 0.9] if per_head else 0.2, 1: 0.9}))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    graphs = []
    with torch.no_grad():
        for t in (900, 800, 700):
            out = run(compiled, dict(inputs, timestep=torch.full((1,), t)))
            graphs.append(counters["stats"]["unique_graphs"])
        eager = run(model, dict(inputs, timestep=torch.full((1,), 700)))
    remove_nabla(handle)
    torch._dynamo.reset()
    if not per_head:
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_per_head_tables_and_config() -> None:
    grid = VideoGrid(2, 9, 13)
    q, k, v = (torch.randn(2, 3, grid.num_tokens, 16) * 2 for _ in range(3))
    spec = HeadSpec((0.2, 0.95, 0.2))
    out, mask = head_attention(q, k, v, grid, 0, "end", "natural", spec)
    for h, thr in enumerate(spec.thresholds):
        assert torch.equal(mask.kept[:, h], nabla_mask(q, k, grid, thr).kept[:, h])
    torch.testing.assert_close(out, nabla_attention(q, k, v, grid, mask=mask))
    with pytest.raises(ValueError, match="2 per-head thresholds for a layer with 3 heads"):
        head_attention(q, k, v, grid, 0, "end", "natural", HeadSpec((0.2, 0.5)))
    with pytest.raises(ValueError, match="threshold must be a number in \\(0, 1\\]"):
        NablaConfig(layer_thresholds={0: [0.5, 1.5]})
    model, inputs = wan()
    with torch.no_grad():
        densities = []
        for value in ([0.2, 0.2], [0.2, 0.95], [0.95, 0.95]):
            handle = apply_nabla(model, NablaConfig(layer_thresholds={0: value}))
            run(model, inputs)
            densities.append(handle.stats().last["blocks.0.attn1"])
            remove_nabla(handle)
    # Layer 0 sees the same q, k in all three runs: mixed heads land between the uniform settings.
    assert densities[0] < densities[1] < densities[2]
