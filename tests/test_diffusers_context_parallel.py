"""apply_nabla on a diffusers model running context-parallel (Ulysses) over 2 gloo processes equals
the single-process apply_nabla output, dense steps included (they run diffusers' own Ulysses path).

diffusers' ``enable_parallelism`` picks an accelerator device (it fails on a CPU-only machine), so
the workers do what it does by hand: set up the ParallelConfig on a CPU mesh, hand it to the model
and its processors, and install diffusers' context-parallel split/gather hooks.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")
sys.path.insert(0, os.path.dirname(__file__))
import diffusers_models  # noqa: E402
from gloo_spawn import spawn_and_wait  # noqa: E402

from nabla_attn.diffusers import NablaConfig, apply_nabla  # noqa: E402

WORLD = 2
DEADLINE_S = 120
CONFIG = dict(threshold=0.5, dense_steps=1)


def _two_steps(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    """A dense step then a sparse one (dense_steps=1; a new timestep starts a step)."""
    outs = []
    for t in (900, 500):
        outs.append(diffusers_models.run(model, {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}))
    return outs


def _worker(rank: int, store: str, outdir: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))  # fmt: skip
        from diffusers import ContextParallelConfig, ParallelConfig
        from diffusers.hooks.context_parallel import apply_context_parallel
        from torch.distributed.device_mesh import init_device_mesh

        model, inputs = diffusers_models.wan(batch=2)
        handle = apply_nabla(model, NablaConfig(**CONFIG))
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("ring", "ulysses"))
        config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=WORLD))
        config.setup(rank, WORLD, torch.device("cpu"), mesh=mesh)
        model._parallel_config = config
        for module in model.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = config
        apply_context_parallel(model, config.context_parallel_config, model._cp_plan)

        import nabla_attn.distributed as nd

        seen: list[int] = []  # local sequence lengths the Ulysses op received
        real = nd.ulysses_nabla_attention

        def counting(q: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(q.shape[2])
            return real(q, *args, **kwargs)

        nd.ulysses_nabla_attention = counting
        with torch.no_grad():
            outs = _two_steps(model, inputs)
        torch.save({"outs": outs, "seen": seen}, os.path.join(outdir, f"out.{rank}.pt"))
        dist.barrier()
    except BaseException as exc:  # the parent reads this instead of waiting for a hang
        Path(outdir, f"error.{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_context_parallel_matches_single_process(tmp_path: Path) -> None:
    model, inputs = diffusers_models.wan(batch=2)
    handle = apply_nabla(model, NablaConfig(**CONFIG))
    with torch.no_grad():
        want = _two_steps(model, inputs)
    assert handle.stats().overall < 0.99  # the second step really is sparse

    spawn_and_wait(_worker, (str(tmp_path / "store"), str(tmp_path)), WORLD, tmp_path, DEADLINE_S, "context-parallel")
    tokens = diffusers_models.FRAMES * diffusers_models.HEIGHT * diffusers_models.WIDTH
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"out.{rank}.pt")
        # the sparse step's 2 layers ran NABLA on this rank's half of the sequence
        assert got["seen"] == [tokens // WORLD] * 2, got["seen"]
        for step, (g, w) in enumerate(zip(got["outs"], want)):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m: f"rank {rank}, step {step}: {m}")
