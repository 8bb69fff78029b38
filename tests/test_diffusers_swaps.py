"""What happens when diffusers replaces processors after apply_nabla, for every family: a processor of
the model's own class is re-wrapped (NABLA keeps running, same output), anything else raises naming
the layer and never reports density for it; ``set_attention_backend`` / ``reset_attention_backend``
work and reach the original processors; CogVideoX's own ``fuse_qkv_projections``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))

from diffusers_models import FACTORIES, run  # noqa: E402

from nabla_attn.diffusers import NablaConfig, apply_nabla, nabla_stats, remove_nabla  # noqa: E402
from nabla_attn.diffusers._core import NablaProcessorBase  # noqa: E402

FAMILIES = sorted(FACTORIES)
CONFIG = NablaConfig(threshold=0.5, backend="reference")


class Foreign:
    """A processor NABLA does not know: runs the model's own one (dense)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _processors(model: torch.nn.Module) -> dict[str, Any]:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def _patched(model: torch.nn.Module, before: dict[str, Any]) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "processor") and m.processor is not before[n]]


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_to_own_class_rewraps_and_foreign_swap_raises(family: str, caplog: pytest.LogCaptureFixture) -> None:
    model, inputs = FACTORIES[family](batch=2)
    before = _processors(model)
    with torch.no_grad():
        apply_nabla(model, CONFIG)
        sparse = run(model, inputs)
        densities = nabla_stats(model).last
        layers = _patched(model, before)
        # a new instance of the model's own processor class on every patched layer, as
        # set_attn_processor / set_processor would install
        for name, module in layers:
            module.set_processor(type(before[name])())
        with caplog.at_level(logging.INFO, logger="nabla_attn.diffusers"):
            again = run(model, inputs)
        assert "NABLA wraps the new ones" in caplog.text
        assert all(isinstance(m.processor, NablaProcessorBase) for _, m in layers)
        assert torch.equal(again, sparse) and nabla_stats(model).last == densities

        first, module = layers[0]
        foreign = Foreign(before[first])
        module.set_processor(foreign)
        with pytest.raises(RuntimeError, match=rf"{first}: .*replaced by Foreign.*remove_nabla"):
            run(model, inputs)
        # the layer no longer runs NABLA: no density for it, the others keep theirs
        assert first not in nabla_stats(model).last and len(nabla_stats(model).last) == len(layers) - 1
        remove_nabla(model)
    assert module.processor is foreign  # the most recent choice stays
    # the others: the model's own processors again (the instances set last, which NABLA had wrapped)
    assert all(type(m.processor) is type(before[n]) for n, m in layers[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attention_backend_after_apply_nabla(family: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, inputs = FACTORIES[family]()
    before = _processors(model)
    with torch.no_grad():
        apply_nabla(model, CONFIG)
        sparse = run(model, inputs)
        model.set_attention_backend("native")
        layers = _patched(model, before)
        for name, module in layers:
            original = before[name]
            if hasattr(type(original), "_attention_backend") or "_attention_backend" in vars(original):
                assert module.processor._attention_backend == AttentionBackendName.NATIVE
                assert original._attention_backend == AttentionBackendName.NATIVE  # dense steps follow it
            else:  # Kandinsky 6 SR's processor has none: diffusers skips it, with NABLA too
                assert not hasattr(module.processor, "_attention_backend")
        out = run(model, inputs)  # still NABLA
        model.reset_attention_backend()
        assert all(getattr(before[n], "_attention_backend", None) is None for n, _ in layers)
        assert len(nabla_stats(model).last) == len(layers)
        remove_nabla(model)
    assert torch.equal(out, sparse)


def test_cogvideox_fuse_and_unfuse_keep_nabla() -> None:
    model, inputs = FACTORIES["cogvideox"](batch=2)
    with torch.no_grad():
        dense = run(model, inputs)
        apply_nabla(model, CONFIG)
        sparse = run(model, inputs)
        model.fuse_qkv_projections()  # installs FusedCogVideoXAttnProcessor2_0 on every layer
        fused = run(model, inputs)
        processor = model.transformer_blocks[0].attn1.processor
        assert isinstance(processor, NablaProcessorBase)
        assert type(processor.original).__name__ == "FusedCogVideoXAttnProcessor2_0"
        model.unfuse_qkv_projections()  # puts back the processors it saved: our older wrappers
        unfused = run(model, inputs)
        assert type(model.transformer_blocks[0].attn1.processor.original).__name__ == "CogVideoXAttnProcessor2_0"
        remove_nabla(model)
    assert type(model.transformer_blocks[0].attn1.processor).__name__ == "CogVideoXAttnProcessor2_0"
    assert (fused - dense).abs().max() > 1e-3  # still sparse
    assert torch.allclose(fused, sparse, atol=1e-5) and torch.equal(unfused, sparse)


def test_wan_set_attn_processor_keeps_nabla() -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs = FACTORIES["wan"]()
    with torch.no_grad():
        apply_nabla(model, CONFIG)
        sparse = run(model, inputs)
        model.set_attn_processor(WanAttnProcessor())  # attn1 and attn2 alike: one shared instance
        again = run(model, inputs)
        remove_nabla(model)
    assert torch.equal(again, sparse)
    assert type(model.blocks[0].attn1.processor) is WanAttnProcessor


def test_custom_processor_errors_name_the_fix() -> None:
    model, inputs = FACTORIES["hunyuan_video"]()
    original = model.transformer_blocks[0].attn.processor
    model.transformer_blocks[0].attn.set_processor(Foreign(original))
    with pytest.raises(TypeError) as info:
        apply_nabla(model)
    message = str(info.value)
    assert "transformer_blocks.0.attn" in message and "Foreign" in message
    assert "set_processor(HunyuanVideoAttnProcessor2_0())" in message and "exclude_layers" in message
    assert "set_default_attn_processor" not in message  # these models have none
    # an excluded layer may keep any processor
    handle = apply_nabla(model, NablaConfig(threshold=0.5, exclude_layers=("transformer_blocks.0.attn",)))
    with torch.no_grad():
        run(model, inputs)
    assert list(handle.stats().last) == ["single_transformer_blocks.0.attn"]
    remove_nabla(handle)
    assert isinstance(model.transformer_blocks[0].attn.processor, Foreign)
