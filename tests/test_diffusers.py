"""nabla_attn.diffusers on tiny random diffusers models (CPU): exactness at threshold 1, sparsity,
exact removal, gradients under gradient checkpointing, odd grids, batches, step counting, pipelines,
torch.compile without recompiles across steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))

from diffusers_models import FACTORIES, run  # noqa: E402

from nabla_attn.diffusers import NablaConfig, apply_nabla, nabla_stats, remove_nabla  # noqa: E402

# The first four families; test_diffusers_families.py covers all of them against an oracle.
FAMILIES = ["cogvideox", "hunyuan_video", "ltx_video", "wan"]
LAYERS = {"wan": 2, "hunyuan_video": 2, "cogvideox": 2, "ltx_video": 2}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    # float32 tolerance relative to the output's scale: NABLA's reference backend sums in a different order.
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def _param_grads(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """All parameter gradients of ``mean(out^2)``, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    run(model, inputs).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_one_matches_dense_and_remove_is_exact(family: str, batch: int) -> None:
    model, inputs = FACTORIES[family](batch=batch)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        dense = run(model, inputs)
        handle = apply_nabla(model, NablaConfig(threshold=1.0))
        nabla = run(model, inputs)
        stats = handle.stats()
        remove_nabla(model)
        restored = run(model, inputs)
    assert _close(nabla, dense), f"{family}: max diff {(nabla - dense).abs().max():.3g}"
    # every self-attention layer ran the sparse path, keeping every block
    assert len(stats.last) == LAYERS[family]
    assert all(d == 1.0 for d in stats.last.values()), stats.last
    assert torch.equal(restored, dense)
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], state_before[k]) for k in after)
    assert all(m.processor is processors[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert not model._forward_pre_hooks  # the grid hook is gone too


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_threshold_differs_and_reports_density(family: str) -> None:
    model, inputs = FACTORIES[family](batch=2)
    with torch.no_grad():
        dense = run(model, inputs)
        apply_nabla(model, NablaConfig(threshold=0.5))
        sparse = run(model, inputs)
        stats = nabla_stats(model)
        remove_nabla(model)
    assert torch.isfinite(sparse).all()
    assert (sparse - dense).abs().max() > 1e-4
    assert len(stats.last) == LAYERS[family]
    assert all(0.05 < d < 0.95 for d in stats.last.values()), stats.last
    assert stats.mean == stats.last and 0.05 < stats.overall < 0.95


@pytest.mark.parametrize("family", FAMILIES)
def test_odd_grid(family: str) -> None:
    # 2 x 9 x 13 tokens: neither side a multiple of the 8-token tile, nor the earlier 10 x 18
    model, inputs = FACTORIES[family](frames=2, height=9, width=13)
    with torch.no_grad():
        dense = run(model, inputs)
        apply_nabla(model, NablaConfig(threshold=1.0))
        nabla = run(model, inputs)
        remove_nabla(model)
        apply_nabla(model, NablaConfig(threshold=0.3, sta_window=(1, 1, 1)))
        sparse = run(model, inputs)
        remove_nabla(model)
    assert _close(nabla, dense)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_with_gradient_checkpointing(family: str) -> None:
    model, inputs = FACTORIES[family]()
    model.train()
    model.enable_gradient_checkpointing()

    dense = _param_grads(model, inputs)
    handle = apply_nabla(model, NablaConfig(threshold=1.0))
    nabla = _param_grads(model, inputs)
    assert handle.stats().last  # the sparse path ran (also in the recomputation)
    remove_nabla(model)
    # Whole-gradient comparison: single parameters whose exact gradient is 0 (key biases under
    # softmax) carry only rounding noise, so per-parameter relative errors are meaningless there.
    assert nabla.shape == dense.shape
    assert (nabla - dense).norm() <= 1e-5 * dense.norm()
    assert (nabla - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_dense_steps_and_step_counting() -> None:
    model, inputs = FACTORIES["wan"]()
    with torch.no_grad():
        dense = run(model, inputs)
        handle = apply_nabla(model, NablaConfig(threshold=0.5, dense_steps=1))
        first = run(model, inputs)  # step 0: the original processors, bit-exact
        again = run(model, inputs)  # same timestep (e.g. the unconditional CFG pass): still step 0
        assert handle.step == 0 and not handle.stats().last
        inputs["timestep"] = inputs["timestep"] - 10
        second = run(model, inputs)  # step 1: sparse
        assert handle.step == 1 and len(handle.stats().last) == 2
        inputs["timestep"] = inputs["timestep"] + 100  # timestep went up: a new generation restarts at 0
        run(model, inputs)
        assert handle.step == 0
        remove_nabla(handle)
    assert torch.equal(first, dense) and torch.equal(again, dense)
    assert second.isfinite().all() and not torch.equal(second, dense)


def test_exclude_layers() -> None:
    model, inputs = FACTORIES["hunyuan_video"]()
    original = model.single_transformer_blocks[0].attn.processor
    with torch.no_grad():
        apply_nabla(model, NablaConfig(threshold=0.5, exclude_layers=(1,)))
        assert model.single_transformer_blocks[0].attn.processor is original
        run(model, inputs)
        assert list(nabla_stats(model).last) == ["transformer_blocks.0.attn"]
        remove_nabla(model)
        apply_nabla(model, NablaConfig(threshold=0.5, exclude_layers=("transformer_blocks",)))
        run(model, inputs)
        assert list(nabla_stats(model).last) == ["single_transformer_blocks.0.attn"]
        remove_nabla(model)
    with pytest.raises(ValueError, match="out of range"):
        apply_nabla(model, NablaConfig(exclude_layers=(7,)))
    with pytest.raises(ValueError, match="match no self-attention layer"):
        apply_nabla(model, NablaConfig(exclude_layers=("blocks.0",)))
    assert model.single_transformer_blocks[0].attn.processor is original


def test_wan22_pipeline_two_experts_cfg_and_dense_steps() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    high, _ = FACTORIES["wan"](seed=0)
    low, _ = FACTORIES["wan"](seed=1)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=high, transformer_2=low, boundary_ratio=0.5,
    )  # fmt: skip
    apply_nabla(pipe, NablaConfig(threshold=0.5, dense_steps=2))
    seen: list[tuple[int, int, list[str]]] = []

    def on_step(p: object, i: int, t: torch.Tensor, kw: dict) -> dict:
        s = nabla_stats(pipe)
        seen.append((i, s.step, sorted(s.last)))
        return {}

    pipe(
        prompt_embeds=torch.randn(1, 12, 16), negative_prompt_embeds=torch.randn(1, 12, 16),
        height=160, width=288, num_frames=9, num_inference_steps=4, output_type="latent",
        generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step,
    )  # fmt: skip
    # unbatched CFG: two forwards per step, counted as one step; steps 0-1 dense
    assert [s[:2] for s in seen] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert seen[0][2] == [] and seen[1][2] == []
    assert seen[2][2] == ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1"]
    assert "transformer_2.blocks.0.attn1" in seen[3][2]  # the low-noise expert ran sparse too
    assert nabla_stats(pipe).forwards == 8
    remove_nabla(pipe)
    assert type(high.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    assert type(low.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_errors() -> None:
    with pytest.raises(TypeError, match="WanTransformer3DModel.*HunyuanVideoTransformer3DModel.*CogVideoX.*LTXVideo"):
        apply_nabla(torch.nn.Linear(2, 2))
    model, inputs = FACTORIES["ltx_video"]()
    apply_nabla(model)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_nabla(model)
    del inputs["num_frames"]
    with pytest.raises(ValueError, match="num_frames"):
        run(model, inputs)
    remove_nabla(model)
    with pytest.raises(ValueError, match="not applied"):
        remove_nabla(model)
    with pytest.raises(ValueError, match="threshold"):
        NablaConfig(threshold=1.5)
    with pytest.raises(ValueError, match="sta_window"):
        NablaConfig(sta_window=(2, 3, 3))
    with pytest.raises(ValueError, match="dense_steps"):
        NablaConfig(dense_steps=-1)
    with pytest.raises(ValueError, match="query_block"):
        NablaConfig(query_block=32)
    assert NablaConfig(sta_window=[3, 3, 3]).sta_window == (3, 3, 3)


def test_missing_diffusers_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'nabla-attn\[diffusers\]'"):
        apply_nabla(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("tiling", ["layer", "forward"])
def test_torch_compile_no_recompiles_across_steps(tiling: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = FACTORIES["wan"]()
    handle = apply_nabla(model, NablaConfig(threshold=0.5, dense_steps=1, tiling=tiling))
    compiled = torch.compile(model)
    graphs = []
    with torch.no_grad():
        for t in (900, 800, 700, 600):
            inputs["timestep"] = torch.full((1,), t)
            out = run(compiled, inputs)
            graphs.append(counters["stats"]["unique_graphs"])
        eager = run(model, inputs)
    remove_nabla(handle)
    torch._dynamo.reset()
    # step 0 dense, step 1 switches to sparse (one recompile), steps 2 and 3 reuse the graphs
    assert graphs[2] == graphs[1] and graphs[3] == graphs[1], graphs
    assert _close(out, eager)


@pytest.mark.parametrize("tiling", ["layer", "forward"])
def test_dynamo_explain_wan_has_no_graph_break(tiling: str) -> None:
    """The whole transformer traces into one graph with NABLA inside (tiling, mask and attention are
    custom ops; the pre-hook runs outside the graph). HunyuanVideo 1.0/1.5 are the known exception:
    their prompt-length masks are read on the host (docs/diffusers.md)."""
    torch._dynamo.reset()
    model, inputs = FACTORIES["wan"]()
    handle = apply_nabla(model, NablaConfig(threshold=0.5, tiling=tiling))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    tiled = handle.tiled
    remove_nabla(handle)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1 and tiled == (tiling == "forward")
    ops = " ".join(str(op) for graph in explained.ops_per_graph for op in graph)
    assert "nabla_attn" in ops  # NABLA is inside the graph, not skipped


def test_wan_i2v_and_ti2v_variants() -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    common = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    )  # fmt: skip
    # I2V: attn2 also attends to image keys (added_kv_proj_dim) and must stay dense and untouched.
    i2v = WanTransformer3DModel(**common, image_dim=8, added_kv_proj_dim=24).eval()
    x_i2v = {
        "hidden_states": torch.randn(1, 4, 3, 20, 36), "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 512, 16), "encoder_hidden_states_image": torch.randn(1, 5, 8),
    }  # fmt: skip
    # TI2V (Wan 2.2 5B): per-token timesteps, 0 on the conditioning frame; the step is read from the max.
    ti2v = WanTransformer3DModel(**common).eval()
    ts = torch.full((1, 540), 700)
    ts[:, :180] = 0
    x_ti2v = {"hidden_states": torch.randn(1, 4, 3, 20, 36), "timestep": ts, "encoder_hidden_states": torch.randn(1, 12, 16)}
    with torch.no_grad():
        for model, inputs in ((i2v, x_i2v), (ti2v, x_ti2v)):
            dense = run(model, inputs)
            handle = apply_nabla(model, NablaConfig(threshold=1.0))
            assert type(model.blocks[0].attn2.processor).__name__ == "WanAttnProcessor"
            nabla = run(model, inputs)
            assert len(handle.stats().last) == 2 and handle.step == 0
            remove_nabla(handle)
            assert _close(nabla, dense)
    assert handle._session.last_timestep == 700.0


@pytest.mark.parametrize("grid", [(3, 10, 18), (2, 8, 16)])
def test_wan_forward_tiling_matches_per_layer_tiling(grid: tuple[int, int, int]) -> None:
    from nabla_attn.diffusers._core import state_of

    model, inputs = FACTORIES["wan"](batch=2, frames=grid[0], height=grid[1], width=grid[2])
    outs, tiled = {}, {}
    with torch.no_grad():
        for tiling in ("layer", "forward", "auto"):
            handle = apply_nabla(model, NablaConfig(threshold=0.5, tiling=tiling))
            outs[tiling] = run(model, inputs)
            tiled[tiling] = state_of(model).tiled
            assert len(handle.stats().last) == 2
            remove_nabla(handle)
    # Same masks, same kernels, only where the permutation happens: identical outputs.
    assert torch.allclose(outs["forward"], outs["layer"], atol=1e-6, rtol=0)
    assert tiled["forward"] and not tiled["layer"]
    assert tiled["auto"] == (grid[1] % 8 == 0 and grid[2] % 8 == 0)  # auto: only where nothing is padding


def test_wan_forward_tiling_backward_with_checkpointing() -> None:
    model, inputs = FACTORIES["wan"]()
    model.train()
    model.enable_gradient_checkpointing()

    dense = _param_grads(model, inputs)
    handle = apply_nabla(model, NablaConfig(threshold=1.0, tiling="forward"))
    nabla = _param_grads(model, inputs)
    remove_nabla(handle)
    assert (nabla - dense).norm() <= 1e-5 * dense.norm()
    with pytest.raises(ValueError, match="WanTransformer3DModel only"):
        apply_nabla(FACTORIES["ltx_video"]()[0], NablaConfig(tiling="forward"))
    with pytest.raises(ValueError, match="exclude_layers"):
        apply_nabla(model, NablaConfig(tiling="forward", exclude_layers=(0,)))
