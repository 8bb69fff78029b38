"""Entry points for frameworks that already shard the sequence: diffusers' context parallelism and xDiT.

diffusers (0.42): ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` splits
the hidden states along the sequence before the first block (``torch.tensor_split`` sizes; the
default "equipartition" sharder also requires the length to divide by N) and hands every attention
processor the local ``[B, S/N, H, D]`` q, k, v plus ``processor._parallel_config``. A NABLA processor
calls :func:`diffusers_ulysses_group` on that config and, when it returns a group, runs
:func:`~nabla_attn.distributed.ulysses_nabla_attention` (or :func:`diffusers_nabla_attention` on the
``[B, S, H, D]`` tensors) instead of diffusers' own Ulysses all-to-all.

xDiT (xfuser): ``xFuserLongContextAttention`` runs its own equal-split all-to-all and then calls the
kernel that yunchang's ``select_flash_attn_impl(attn_type, stage="fwd-only", attn_processor=...)``
returns; recent yunchang versions return ``attn_processor`` itself for attention types they do not
know. :func:`xfuser_attn_processor` builds such a kernel: NABLA over the full sequence for the local
heads, forward only, ring degree 1 only, no load balancing (xfuser fixes the head split).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..attention import Backend, nabla_attention
from ..grid import VideoGrid
from .comm import ProcessGroup
from .ulysses import ulysses_nabla_attention


def diffusers_ulysses_group(parallel_config: Any) -> ProcessGroup | None:
    """The Ulysses process group of a diffusers ``ParallelConfig`` / ``ContextParallelConfig``.

    Returns None when the model runs without context parallelism (then call
    :func:`nabla_attn.nabla_attention`). Raises for ring attention: NABLA's per-head mask needs each
    head's full sequence on one rank, which only Ulysses gives.
    """
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None:
        return None
    ring = int(getattr(cp, "ring_degree", 1) or 1)
    ulysses = int(getattr(cp, "ulysses_degree", 1) or 1)
    if ring > 1:
        raise ValueError(
            f"NABLA runs under Ulysses sequence parallelism only, got ring_degree={ring} "
            f"(ulysses_degree={ulysses}); use ContextParallelConfig(ulysses_degree={ring * ulysses})"
        )
    if ulysses == 1:
        return None
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise RuntimeError(
            "the ContextParallelConfig has not been set up yet (model.enable_parallelism(...) sets its mesh)"
        )
    return mesh.get_group()


def diffusers_nabla_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid: VideoGrid,
    parallel_config: Any,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    text_tokens: int = 0,
    text_position: str = "end",
    **kwargs: Any,
) -> torch.Tensor:
    """NABLA on diffusers-layout ``[B, S_local, H, D]`` tensors, sequence-parallel when the config says so.

    Without context parallelism this is :func:`nabla_attn.nabla_attention` on the full sequence.
    Extra keyword arguments go to :func:`ulysses_nabla_attention` (``balance``, ``backend``, ...).
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    group = diffusers_ulysses_group(parallel_config)
    if group is None:
        allowed = {key_: kwargs[key_] for key_ in ("backend", "query_block", "scale", "mask") if key_ in kwargs}
        out = nabla_attention(q, k, v, grid, threshold, sta_window, text_tokens, text_position, **allowed)
    else:
        out = ulysses_nabla_attention(q, k, v, grid, threshold, sta_window, text_tokens, text_position, group=group, **kwargs)
    return out.transpose(1, 2)  # type: ignore[union-attr]


def xfuser_attn_processor(
    grid: VideoGrid,
    threshold: float | None = 0.7,
    sta_window: Sequence[int] | None = None,
    text_tokens: int = 0,
    text_position: str = "end",
    *,
    backend: Backend = "auto",
    query_block: int = 64,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A yunchang/xfuser attention kernel running NABLA: pass it as ``attn_processor``.

    The returned function takes ``(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)``
    with ``[B, S, H_local, D]`` tensors holding the *full* sequence (video in ``grid`` order plus the
    joint text tokens xfuser concatenates at ``text_position``) and returns ``(out, lse)``. NABLA
    does not compute the log-sum-exp; ``lse`` is NaN so that a ring merge (ring degree > 1), which
    would need it, poisons the output instead of returning a silently wrong one.
    """

    def nabla_kernel(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dropout_p: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if dropout_p:
            raise ValueError(f"NABLA has no attention dropout, got dropout_p={dropout_p}")
        if causal:
            raise ValueError("NABLA is bidirectional attention, got causal=True")
        out = nabla_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid, threshold, sta_window,
            text_tokens, text_position, backend=backend, query_block=query_block, scale=softmax_scale,
        )  # fmt: skip
        B, S, H, _ = q.shape
        lse = torch.full((B, H, S), float("nan"), dtype=torch.float32, device=q.device)
        return out.transpose(1, 2), lse  # type: ignore[union-attr]

    return nabla_kernel
