"""Ulysses NABLA on 1, 2 and 3 gloo processes equals single-process nabla_attention (outputs, gradients, masks).

Each world size is one spawn running every case (process start-up dominates the cost). Workers
write their local outputs, gradients and decisions to files; the parent computes the single-process
reference and compares. Bounded: the process group has a 60 s collective timeout and the parent
kills its own workers after a deadline, so a hung collective fails the test instead of the CI job.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from gloo_spawn import spawn_and_wait
from nabla_attn import VideoGrid, nabla_attention
from nabla_attn.distributed import (
    UlyssesInfo,
    balance_heads,
    contiguous_heads,
    even_head_counts,
    rank_loads,
    shard_sizes,
    ulysses_nabla_attention,
    xfuser_attn_processor,
)

DEADLINE_S = 100.0

# Each case: grid, text, heads, batch, head dims, NABLA parameters, sharding options.
CASES: dict[str, dict[str, Any]] = {
    # Odd grid (edge tiles on both axes), text at the end, balancing on, uneven sequence split.
    "odd_text_end_balanced": dict(grid=(3, 13, 22), text=7, pos="end", H=4, B=1, D=16, Dv=16, threshold=0.5,
                                  sta=None, qb=64, balance=True, split=None, pad=False, mask=False, gain=0.0),
    # Text at the start, STA window unioned, 128-token query blocks, 5 heads (no divisor of 2 or 3),
    # q, k, v as [B, S, H, D] memory seen through a transpose (what diffusers processors hold).
    "odd_text_start_sta_qb128": dict(grid=(3, 13, 22), text=5, pos="start", H=5, B=1, D=16, Dv=16, threshold=0.6,
                                     sta=(1, 3, 3), qb=128, balance=False, split=None, pad=False, mask=False,
                                     strided=True),
    # Batch 2, balancing, torch.chunk split with every shard padded to the longest.
    "chunk_split_padded_batch2": dict(grid=(2, 9, 17), text=3, pos="end", H=5, B=2, D=16, Dv=16, threshold=0.4,
                                      sta=None, qb=64, balance=True, split="chunk", pad=True, mask=False, gain=0.0),
    # v with a different head_dim (separate all-to-all for v), balanced.
    "value_head_dim_differs": dict(grid=(2, 8, 16), text=0, pos="end", H=3, B=1, D=16, Dv=8, threshold=0.5,
                                   sta=None, qb=64, balance=True, split=None, pad=False, mask=False, gain=0.0),
    # Pure STA (no threshold): one table for all heads.
    "sta_only": dict(grid=(3, 10, 20), text=4, pos="start", H=2, B=1, D=16, Dv=16, threshold=None,
                     sta=(1, 1, 3), qb=64, balance=True, split=None, pad=False, mask=False),
    # Heads of equal statistics: balancing (default min gain) keeps the contiguous split.
    "even_heads_default_gain": dict(grid=(2, 16, 16), text=0, pos="end", H=4, B=1, D=16, Dv=16, threshold=0.5,
                                    sta=None, qb=64, balance=True, split=None, pad=False, mask=False, scales=(1.0, 1.0)),
    # Plain split (tables built after the all-to-all from each rank's own heads), batch 2, fewer
    # heads than ranks at world 3 (a rank with no heads builds an empty table).
    "plain_two_heads_batch2": dict(grid=(2, 9, 17), text=3, pos="end", H=2, B=2, D=16, Dv=16, threshold=0.5,
                                   sta=None, qb=64, balance=False, split=None, pad=False, mask=False),
    # A precomputed global mask (balancing from its per-head counts).
    "given_mask": dict(grid=(2, 9, 17), text=0, pos="end", H=4, B=1, D=16, Dv=16, threshold=0.3,
                       sta=None, qb=64, balance=True, split=None, pad=False, mask=True),
}


def _inputs(name: str, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full-sequence inputs, identical in every process (seeded by the case name)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    grid = VideoGrid(*case["grid"])
    S = grid.num_tokens + case["text"]
    B, H, D, Dv = case["B"], case["H"], case["D"], case["Dv"]
    # Per-head scales spread the heads' mask densities, so balancing has something to balance.
    lo, hi = case.get("scales", (0.5, 6.0))
    scale = torch.linspace(lo, hi, H)[torch.randperm(H, generator=g)].view(1, H, 1, 1)
    q = torch.randn(B, H, S, D, generator=g) * scale
    k = torch.randn(B, H, S, D, generator=g) * scale
    v = torch.randn(B, H, S, Dv, generator=g)
    go = torch.randn(B, H, S, Dv, generator=g)
    return dict(q=q, k=k, v=v, go=go)


def _reference(name: str, case: dict[str, Any]):
    t = _inputs(name, case)
    q, k, v = (t[n].clone().requires_grad_(True) for n in "qkv")
    grid = VideoGrid(*case["grid"])
    out, mask = nabla_attention(
        q, k, v, grid, case["threshold"], case["sta"], case["text"], case["pos"],
        backend="reference", query_block=case["qb"], return_mask=True,
    )  # fmt: skip
    (out * t["go"]).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, mask


def _sizes(case: dict[str, Any], world: int) -> list[int]:
    S = VideoGrid(*case["grid"]).num_tokens + case["text"]
    return shard_sizes(S, world, case["split"] or "tensor_split")


def _worker(rank: int, world: int, store: str, outdir: str) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        torch.set_num_threads(1)
        for name, case in CASES.items():
            t = _inputs(name, case)
            grid = VideoGrid(*case["grid"])
            sizes = _sizes(case, world)
            o, n, c = sum(sizes[:rank]), sizes[rank], max(sizes)
            local = {}
            for key in ("q", "k", "v", "go"):
                x = t[key][:, :, o : o + n]
                if case["pad"] and n < c:
                    # Padding holds garbage on purpose: it must never reach an output.
                    x = torch.cat([x, torch.full_like(x[:, :, :1], 1e4).expand(-1, -1, c - n, -1)], dim=2)
                local[key] = x.transpose(1, 2).contiguous().transpose(1, 2) if case.get("strided") else x.contiguous()
            q, k, v = (local[x].requires_grad_(True) for x in "qkv")
            mask = None
            if case["mask"]:
                mask = _reference(name, case)[4]
            out, info = ulysses_nabla_attention(
                q, k, v, grid, case["threshold"], case["sta"], case["text"], case["pos"],
                balance=case["balance"], backend="reference", query_block=case["qb"], mask=mask,
                shard_sizes=sizes if case["split"] else None, return_info=True,
                balance_min_gain=case.get("gain", 0.1),
            )  # fmt: skip
            assert isinstance(info, UlyssesInfo)
            (out * local["go"]).sum().backward()
            torch.save(
                dict(out=out.detach().clone(), dq=q.grad, dk=k.grad, dv=v.grad, assignment=info.assignment,
                     head_costs=info.head_costs, local_heads=info.local_heads, kept=info.mask.kept.clone(),
                     sizes=info.shard_sizes),
                os.path.join(outdir, f"{name}.{rank}.pt"),
            )  # fmt: skip
        if world > 1:
            _diffusers_case(rank, world, outdir)
        # A shard of the wrong length on every rank fails before any collective (no hang). (A wrong
        # length on one rank only would leave the others in the first collective until the timeout.)
        grid = VideoGrid(2, 8, 16)
        bad = torch.randn(1, 2, max(shard_sizes(grid.num_tokens, world)) + 1, 16)
        try:
            ulysses_nabla_attention(bad, bad, bad, grid, 0.5)
        except ValueError as exc:
            Path(outdir, f"bad_length.{rank}.txt").write_text(str(exc))
        dist.barrier()
    except BaseException:
        Path(outdir, f"error.{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _diffusers_case(rank: int, world: int, outdir: str) -> None:
    """The diffusers entry point with a real diffusers ContextParallelConfig on a CPU device mesh."""
    try:
        from diffusers import ContextParallelConfig
    except ImportError:
        return
    from torch.distributed.device_mesh import init_device_mesh

    from nabla_attn.distributed import diffusers_nabla_attention

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    cp = ContextParallelConfig(ulysses_degree=world)
    cp.setup(rank, world, torch.device("cpu"), mesh)
    name = "odd_text_end_balanced"
    case = CASES[name]
    t = _inputs(name, case)
    sizes = _sizes(case, world)
    o, n = sum(sizes[:rank]), sizes[rank]
    # diffusers' processors hold [B, S_local, H, D]
    q, k, v = (t[x][:, :, o : o + n].transpose(1, 2).contiguous() for x in "qkv")
    out = diffusers_nabla_attention(q, k, v, VideoGrid(*case["grid"]), cp, case["threshold"], case["sta"],
                                    case["text"], case["pos"], backend="reference")  # fmt: skip
    torch.save(out, os.path.join(outdir, f"diffusers.{rank}.pt"))


def _spawn(world: int, tmp: Path) -> Path:
    outdir = tmp / f"world{world}"
    outdir.mkdir()
    spawn_and_wait(_worker, (world, str(tmp / f"store{world}"), str(outdir)), world, outdir, DEADLINE_S, "distributed")
    return outdir


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["world1", "world2", "world3"])
def world_results(request, tmp_path_factory) -> tuple[int, Path]:
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"ulysses{world}"))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(world_results: tuple[int, Path], name: str) -> None:
    world, outdir = world_results
    case = CASES[name]
    out_ref, dq_ref, dk_ref, dv_ref, mask_ref = _reference(name, case)
    sizes = _sizes(case, world)
    H = case["H"]
    seen: list[int] = []
    for rank in range(world):
        got = torch.load(outdir / f"{name}.{rank}.pt")
        o, n = sum(sizes[:rank]), sizes[rank]
        assert got["sizes"] == sizes
        for key, ref in (("out", out_ref), ("dq", dq_ref), ("dk", dk_ref), ("dv", dv_ref)):
            x = got[key]
            torch.testing.assert_close(x[:, :, :n], ref[:, :, o : o + n], rtol=1e-5, atol=1e-5, msg=f"{key} rank {rank}")
            if x.shape[2] > n:  # padded shard: padding rows give zero output and zero gradient
                assert torch.count_nonzero(x[:, :, n:]) == 0, f"{key} padding rows of rank {rank} are not zero"
        # The rank's tables equal the single-process mask for its heads, bit for bit.
        ref_kept = mask_ref.kept
        want = ref_kept[:, got["local_heads"]] if ref_kept.shape[1] == H else ref_kept
        assert torch.equal(got["kept"], want.expand_as(got["kept"])), f"mask differs on rank {rank}"
        seen += got["local_heads"]
        assert len(got["local_heads"]) == even_head_counts(H, world)[rank]
        assert got["assignment"] == torch.load(outdir / f"{name}.0.pt")["assignment"], "ranks disagree on heads"
    assert sorted(seen) == list(range(H))
    got0 = torch.load(outdir / f"{name}.0.pt")
    if case["balance"] and got0["head_costs"] is not None:
        costs = got0["head_costs"]
        ref_costs = mask_ref.kept.expand(case["B"], H, -1, -1).sum(dim=(0, 2, 3)).tolist()
        assert costs == ref_costs
        plain, bal = contiguous_heads(H, world), balance_heads(costs, world)
        assert max(rank_loads(got0["assignment"], costs)) <= max(rank_loads(plain, costs))
        # Heads move only when that lowers the busiest rank's kept blocks by balance_min_gain.
        gain = 1.0 - max(rank_loads(bal, costs)) / max(rank_loads(plain, costs))
        assert got0["assignment"] == (bal if gain >= case.get("gain", 0.1) and gain > 0 else plain)


def test_wrong_shard_length_names_the_numbers(world_results: tuple[int, Path]) -> None:
    world, outdir = world_results
    grid = VideoGrid(2, 8, 16)
    for rank in range(world):
        msg = (outdir / f"bad_length.{rank}.txt").read_text()
        sizes = shard_sizes(grid.num_tokens, world)
        assert f"local sequence length {max(sizes) + 1}" in msg, msg
        assert f"this rank {sizes[rank]} tokens" in msg and f"{world} ranks" in msg, msg


def test_diffusers_context_parallel_config_entry_point(world_results: tuple[int, Path]) -> None:
    world, outdir = world_results
    if world == 1:
        pytest.skip("diffusers' ContextParallelConfig needs a degree > 1")
    pytest.importorskip("diffusers")
    name = "odd_text_end_balanced"
    case = CASES[name]
    out_ref = _reference(name, case)[0]
    sizes = _sizes(case, world)
    for rank in range(world):
        got = torch.load(outdir / f"diffusers.{rank}.pt")  # [B, S_local, H, D]
        o, n = sum(sizes[:rank]), sizes[rank]
        torch.testing.assert_close(got.transpose(1, 2), out_ref[:, :, o : o + n], rtol=1e-5, atol=1e-5)


def test_diffusers_group_rejects_ring_attention() -> None:
    from types import SimpleNamespace

    from nabla_attn.distributed import diffusers_ulysses_group

    assert diffusers_ulysses_group(None) is None
    assert diffusers_ulysses_group(SimpleNamespace(context_parallel_config=None)) is None
    with pytest.raises(ValueError, match="ring_degree=2"):
        diffusers_ulysses_group(SimpleNamespace(ring_degree=2, ulysses_degree=1))
    with pytest.raises(RuntimeError, match="enable_parallelism"):
        diffusers_ulysses_group(SimpleNamespace(ring_degree=1, ulysses_degree=2, _ulysses_mesh=None))


# ---- single-process unit tests ---------------------------------------------------------------------


def test_shard_sizes_conventions() -> None:
    assert shard_sizes(10, 3) == [4, 3, 3] == [len(c) for c in torch.arange(10).tensor_split(3)]
    assert shard_sizes(10, 3, "chunk") == [4, 4, 2] == [len(c) for c in torch.arange(10).chunk(3)]
    assert shard_sizes(9, 4, "chunk") == [3, 3, 3, 0]
    with pytest.raises(ValueError, match="mode"):
        shard_sizes(9, 4, "strided")  # type: ignore[arg-type]


def test_balance_heads_lpt_keeps_counts_and_beats_contiguous() -> None:
    costs = [10, 9, 8, 1, 1, 1]
    plain = contiguous_heads(6, 2)
    bal = balance_heads(costs, 2)
    assert [len(a) for a in bal] == [3, 3]
    assert sorted(h for a in bal for h in a) == list(range(6))
    assert max(rank_loads(bal, costs)) < max(rank_loads(plain, costs))
    assert rank_loads(bal, costs) == [12.0, 18.0]  # {10,1,1} and {9,8,1}: the best 3+3 split here
    # Deterministic, and uneven head counts follow even_head_counts.
    assert balance_heads(costs, 2) == bal
    assert [len(a) for a in balance_heads([1, 2, 3, 4, 5], 3)] == [2, 2, 1]
    with pytest.raises(ValueError, match="capacities"):
        balance_heads([1, 2], 2, capacities=[2, 1])


def test_needs_initialised_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_nabla_attention(q, q, q, VideoGrid(1, 8, 8))


def test_xfuser_processor_matches_nabla_attention() -> None:
    grid = VideoGrid(2, 9, 17)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, grid.num_tokens + 4, 3, 16, generator=g) for _ in range(3))  # [B, S, H, D]
    fn = xfuser_attn_processor(grid, 0.5, None, 4, "end", backend="reference")
    out, lse = fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1))
    ref = nabla_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid, 0.5, None, 4, "end", backend="reference")
    torch.testing.assert_close(out, ref.transpose(1, 2))
    assert lse.shape == (1, 3, q.shape[1]) and torch.isnan(lse).all()
    with pytest.raises(ValueError, match="causal"):
        fn(q, k, v, causal=True)



_FUSED_CHECK = """
import math, os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from nabla_attn import MaskSpec, TokenLayout, VideoGrid, mask_from_means, masks
for grid, text, pos, thr, win, qb in [((3, 13, 22), 7, "end", 0.5, None, 64), ((2, 9, 17), 5, "start", 0.3, (1, 3, 3), 128)]:
    lay = TokenLayout(VideoGrid(*grid), text, pos)
    g = torch.Generator().manual_seed(0)
    qa, ka = (torch.randn(2, 3, lay.num_video_blocks, 16, generator=g) * 2 for _ in range(2))
    spec = MaskSpec(thr, win, qb)
    fused = mask_from_means(qa, ka, lay, spec, backend="triton")
    assert torch.equal(fused.kept, masks.mask_from_means(qa, ka, lay, spec).kept), (grid, qb)
print("ok")
"""


def test_fused_tables_from_means_match_eager() -> None:
    # On CUDA the Ulysses path builds tables from gathered means with the fused Triton builder
    # (mask_from_means); here the same kernels run under Triton's CPU interpreter (in a subprocess:
    # the interpreter switch is process-wide) and must give the eager definition's tables.
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("world", [2, 4])
def test_wan_720p_gathers_move_whole_tile_rows(world: int) -> None:
    # Wan 14B 720p on 2 or 4 ranks: both gathers around the attention move 8-token segments, and
    # expanding the segment indices gives back the token indices of the general path.
    from nabla_attn.distributed import maps
    from nabla_attn.grid import TokenLayout

    layout = TokenLayout(VideoGrid(21, 40, 80))
    sizes = tuple(shard_sizes(layout.seq_len, world))
    h_r = 40 // world
    g_in, g_out, _, n_in, n_out = maps.gathers(layout, sizes, h_r, 1, torch.device("cpu"))
    assert (n_in, n_out) == (8, 8)
    slot_of_tiled, tiled_of_slot, _ = maps.slot_maps(layout, sizes)
    c, T = max(sizes), layout.tiled_len
    tokens_in = (g_in[:, None] * 8 + torch.arange(8)).reshape(1, h_r, T)
    want_in = (slot_of_tiled // c * h_r + torch.arange(h_r).view(1, h_r, 1)) * c + slot_of_tiled % c
    assert torch.equal(tokens_in, want_in)
    tokens_out = (g_out[:, None] * 8 + torch.arange(8)).reshape(world, h_r, 1, c)
    want_out = torch.arange(h_r).view(1, h_r, 1, 1) * T + tiled_of_slot.view(world, 1, 1, c)
    assert torch.equal(tokens_out, want_out)
    # An odd grid falls back to single tokens.
    odd = maps.gathers(TokenLayout(VideoGrid(3, 13, 22)), tuple(shard_sizes(858, 2)), 2, 1, torch.device("cpu"))
    assert odd[3:] == (1, 1)
