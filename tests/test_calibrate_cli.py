"""``nabla calibrate`` on the bundled model, ``nabla demo --calibration``, and the demo model's
per-layer / per-head thresholds (CPU, tiny sizes)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from nabla_attn import cli  # noqa: E402
from nabla_attn.demo import calibrate_cli  # noqa: E402
from nabla_attn.demo import cli as demo_cli  # noqa: E402
from nabla_attn.demo.model import WEIGHTS_FILE, MaskPolicy, assets_dir, load_bundled, sample  # noqa: E402
from nabla_attn.demo.policy_spec import parse_policy  # noqa: E402


def _parse(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--density", "0"], "--density must be in (0, 1], got 0.0"),
        (["--density", "0.2", "--error", "0.1"], "give --density or --error, not both"),
        (["--error", "-1"], "--error must be > 0"),
        (["--thresholds", "0.5,x"], "--thresholds must be comma-separated numbers"),
        (["--thresholds", "0.5,1.5"], "--thresholds must be numbers in (0, 1]"),
        (["--sta-window", "2,3,3"], "--sta-window must be three positive odd integers"),
        (["--clips", "cats"], "--clips must be 'all' or names from"),
        (["--steps", "4", "--max-dense-steps", "4"], "--max-dense-steps must be in 0..3"),
        (["--query-stride", "0"], "--query-stride must be >= 1"),
        (["--weights", "/no/such.safetensors"], "no such file"),
    ],
)
def test_calibrate_bad_options(argv: list[str], message: str, capsys, tmp_path) -> None:
    assert calibrate_cli.run(_parse(calibrate_cli, argv + ["--out", str(tmp_path / "c.json")])) == 2
    err = capsys.readouterr().err
    assert "nabla calibrate: error:" in err and message in err


def test_calibrate_end_to_end_then_demo_uses_it(tmp_path, capsys) -> None:
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--steps", "2", "--clips", "carphone", "--thresholds", "0.3,0.6,0.9", "--query-stride", "16",
            "--density", "0.5", "--out", str(out), "--no-progress", "--threads", "2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "chosen (" in text and "blocks.4.attn1" in text
    data = json.loads(out.read_text())
    assert data["choice"]["density"] <= 0.5 and len(data["layers"]) == 5
    assert out.with_suffix(".png").stat().st_size > 10_000
    # The demo loads it (and refuses it together with a threshold).
    demo_out = tmp_path / "demo"
    bundled = str(assets_dir() / WEIGHTS_FILE)  # as --nabla-weights: the path for fine-tuned weights
    args = _parse(demo_cli, ["--steps", "2", "--calibration", str(out), "--out", str(demo_out), "--no-progress",
                             "--format", "gif", "--clip", "carphone", "--nabla-weights", bundled])
    assert demo_cli.run(args) == 0
    text = capsys.readouterr().out
    assert "NABLA settings from the calibration cal.json" in text and "PSNR" in text
    assert f"NABLA run uses {bundled}" in text
    summary = json.loads((demo_out / "summary.json").read_text())
    assert summary["options"]["calibration"] == str(out)
    assert demo_cli.run(_parse(demo_cli, ["--calibration", str(out), "--threshold", "0.5"])) == 2
    assert "--calibration sets thresholds and dense steps itself; drop --threshold" in capsys.readouterr().err
    assert demo_cli.run(_parse(demo_cli, ["--calibration", str(tmp_path / "none.json")])) == 2
    assert "no such file" in capsys.readouterr().err


def test_demo_model_per_layer_and_per_head_thresholds() -> None:
    model = load_bundled()
    noise = torch.randn(1, 3, 2, 16, 32, generator=torch.Generator().manual_seed(0))

    def run(layer2: float | tuple[float, ...]) -> list:
        policy = MaskPolicy("nabla", layer_thresholds=(0.2, None, layer2, 0.9, 1.0))
        model.set_attention(policy)
        model.reset_stats(record_error=True)
        try:
            sample(model, noise, torch.tensor([0]), steps=1)
        finally:
            model.set_attention(None)
        return [p.stats[0] for p in model.processors]

    uniform = run(0.9)[2].head_density
    st = run((0.2, 0.9, 0.5, 0.9))
    assert st[1].density == 1.0 and st[1].rel_error == 0.0  # the dense layer
    assert st[4].density == 1.0 and st[4].rel_error < 1e-5  # threshold 1 keeps everything
    # Layer 2 sees the same input in both runs (layers 0-1 are unchanged): heads with threshold 0.9 keep
    # what the uniform 0.9 run keeps, the others fewer blocks.
    heads = st[2].head_density
    assert heads[1] == uniform[1] and heads[3] == uniform[3]
    assert heads[0] < uniform[0] and heads[2] < uniform[2]
    policy = MaskPolicy("nabla", layer_thresholds=(0.2, None, (0.2, 0.9, 0.5, 0.9), 0.9, 1.0))
    assert "h(0.2,0.9,0.5,0.9)" in policy.label()
    with pytest.raises(ValueError, match="layer_thresholds must be in"):
        MaskPolicy("nabla", layer_thresholds=(1.5,))
    with pytest.raises(ValueError, match="need kind 'nabla' or 'nabla\\+sta'"):
        MaskPolicy("sta", sta_window=(1, 3, 3), layer_thresholds=(0.5,))


def test_policy_strings() -> None:
    assert parse_policy("dense", 5) == (None, 0)
    assert parse_policy("nabla:0.5", 5)[0].threshold == 0.5
    assert parse_policy("nabla+sta:0.4:1,3,3", 5)[0].sta_window == (1, 3, 3)
    assert parse_policy("sta:5,3,3", 5)[0].kind == "sta"
    assert parse_policy("random:0.2", 5)[0].density == 0.2
    for bad, message in (("nabla:x", "mask policy 'nabla:x'"), ("sta:1,3", "three odd integers"),
                         ("calibrated:/no/file.json", "calibration file not found"), ("fancy:1", "expected nabla:THR")):
        with pytest.raises(ValueError, match=message):
            parse_policy(bad, 5)


def test_demo_defaults_to_the_bundled_calibration_and_finetuned_weights() -> None:
    s = demo_cli.validate(_parse(demo_cli, []))
    assert s["calibration"] == assets_dir() / demo_cli.BUNDLED_CALIBRATION
    assert s["nabla_weights"] == str(assets_dir() / demo_cli.BUNDLED_NABLA_WEIGHTS)
    assert s["config"].layer_thresholds is not None and s["config"].dense_steps == 0
    tuned = load_bundled(s["nabla_weights"])
    assert "calibrat" in tuned.config.trained["finetuned"]["mask"]  # trained with the calibrated masks
    # Anything that changes the masks drops both; 'none' keeps the calibration with the dense weights.
    for argv in (["--threshold", "0.5"], ["--calibration", "none"], ["--size", "large"], ["--query-block", "128"]):
        s = demo_cli.validate(_parse(demo_cli, argv))
        assert s["calibration"] is None and s["nabla_weights"] is None, argv
    s = demo_cli.validate(_parse(demo_cli, ["--nabla-weights", "none"]))
    assert s["calibration"] is not None and s["nabla_weights"] is None
