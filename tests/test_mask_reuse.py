"""Reusing NABLA tables across denoising steps (NablaConfig.mask_reuse_steps / mask_reuse_tolerance)
on the tiny random diffusers Wan model (CPU): off by default, tables rebuilt every k steps, per
forward slot (unbatched CFG), on drift past the tolerance, and at a new generation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))

from diffusers_models import run, wan  # noqa: E402

from nabla_attn.diffusers import NablaConfig, apply_nabla, remove_nabla  # noqa: E402


def _steps(model, inputs, times, per_step=1, other=None):
    outs = []
    with torch.no_grad():
        for t in times:
            for i in range(per_step):
                x = inputs if i == 0 or other is None else other
                outs.append(run(model, dict(x, timestep=torch.full((x["hidden_states"].shape[0],), t))))
    return outs


def _cache(model):
    return model.blocks[0].attn1.processor._reuse_cache


def test_off_by_default_and_unchanged() -> None:
    model, inputs = wan()
    handle = apply_nabla(model, NablaConfig(threshold=0.5))
    try:
        base = _steps(model, inputs, (900, 800))
        assert not hasattr(model.blocks[0].attn1.processor, "_reuse_cache")
    finally:
        remove_nabla(handle)
    # One-step reuse windows (a rebuild every step) give the same outputs as no reuse.
    handle = apply_nabla(model, NablaConfig(threshold=0.5, mask_reuse_steps=2))
    try:
        first = _steps(model, inputs, (900,))
    finally:
        remove_nabla(handle)
    torch.testing.assert_close(first[0], base[0], rtol=0, atol=0)


def test_tables_rebuilt_every_k_steps_and_at_a_new_generation() -> None:
    model, inputs = wan()
    handle = apply_nabla(model, NablaConfig(threshold=0.5, mask_reuse_steps=3))
    try:
        # steps 0..4, then a new generation (the timestep goes up) at step 0 again
        gen = torch.Generator().manual_seed(3)
        noisy = [dict(inputs, hidden_states=torch.randn(inputs["hidden_states"].shape, generator=gen)) for _ in range(6)]
        with torch.no_grad():
            for t, x in zip((900, 800, 700, 600, 500, 900), noisy):
                run(model, dict(x, timestep=torch.full((1,), t)))
                if t == 700:
                    assert _cache(model).entries[0].step == 0  # step 2 still uses step 0's table
        cache = _cache(model)
        assert (cache.built, cache.reused) == (3, 3)  # built at steps 0, 3 and the new step 0
        assert cache.entries[0].step == 0
        stats = handle.stats()
        assert all(0 < d < 1 for d in stats.mean.values())
    finally:
        remove_nabla(handle)


def test_each_forward_of_a_step_keeps_its_own_table() -> None:
    # Unbatched classifier-free guidance: two forwards (cond, uncond) per step at one timestep.
    model, inputs = wan()
    other = dict(inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]),
                 hidden_states=torch.randn_like(inputs["hidden_states"]))
    handle = apply_nabla(model, NablaConfig(threshold=0.5, mask_reuse_steps=2))
    try:
        _steps(model, inputs, (900, 800), per_step=2, other=other)
        cache = _cache(model)
        assert (cache.built, cache.reused) == (2, 2)
        assert set(cache.entries) == {0, 1}
        assert not torch.equal(cache.entries[0].mask.kept, cache.entries[1].mask.kept)
    finally:
        remove_nabla(handle)


@pytest.mark.parametrize("tolerance, built", [(1e-9, 4), (1e9, 2)])
def test_drift_tolerance_rebuilds_early(tolerance: float, built: int) -> None:
    model, inputs = wan()
    gen = torch.Generator().manual_seed(5)
    handle = apply_nabla(model, NablaConfig(threshold=0.5, mask_reuse_steps=3, mask_reuse_tolerance=tolerance))
    try:
        with torch.no_grad():
            for t in (900, 800, 700, 600):
                x = dict(inputs, hidden_states=torch.randn(inputs["hidden_states"].shape, generator=gen))
                run(model, dict(x, timestep=torch.full((1,), t)))
        cache = _cache(model)
        assert cache.built == built and cache.built + cache.reused == 4
    finally:
        remove_nabla(handle)


def test_bad_reuse_settings() -> None:
    with pytest.raises(ValueError, match="mask_reuse_steps must be an integer >= 1"):
        NablaConfig(mask_reuse_steps=0)
    with pytest.raises(ValueError, match="mask_reuse_tolerance needs mask_reuse_steps > 1"):
        NablaConfig(mask_reuse_tolerance=0.1)
    with pytest.raises(ValueError, match="mask_reuse_tolerance must be a number > 0"):
        NablaConfig(mask_reuse_steps=2, mask_reuse_tolerance=0.0)
