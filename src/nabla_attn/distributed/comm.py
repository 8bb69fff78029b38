"""Collectives used by the Ulysses path: a differentiable all-to-all with uneven splits, group helpers.

Every collective here is called by every rank of the group in the same order with matching sizes;
the callers derive all sizes from arguments that are equal on every rank (sequence shard sizes, the
head assignment) so no rank can skip or reorder a collective.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size_rank(group: ProcessGroup | None) -> tuple[int, int]:
    """World size and this process's rank inside ``group`` (the default group when None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ulysses_nabla_attention needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group(...)); for one process use nabla_attention"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all_rows(
    x: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], group: ProcessGroup | None, zero_rows: int = 0
) -> torch.Tensor:
    """all_to_all_single along dim 0: send ``send_rows[p]`` leading rows to rank p, receive ``recv_rows[p]`` from it."""
    x = x.contiguous()
    n = int(sum(recv_rows))
    buf = x.new_empty((n + zero_rows, *x.shape[1:]))
    if zero_rows:
        buf[n:].zero_()
    out = buf[:n]
    # Called even when this rank sends and receives nothing: a rank that skipped the collective
    # would leave the others waiting forever.
    dist.all_to_all_single(out, x, output_split_sizes=list(recv_rows), input_split_sizes=list(send_rows), group=group)
    return buf


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of several tensors: the adjoint of an all-to-all is the all-to-all
    with the splits swapped.

    All tensors travel inside one autograd node so the backward collectives run in one fixed order
    on every rank (separate nodes could be scheduled in different orders on different ranks, or
    skipped on a rank whose loss does not use one of them, and the collectives would mismatch).
    Outputs whose gradient is unused get zeros, so every rank joins every backward collective.
    """

    @staticmethod
    def forward(ctx, send_rows: tuple[int, ...], recv_rows: tuple[int, ...], group: ProcessGroup | None, zero_rows: int, *xs: torch.Tensor):  # type: ignore[override]
        ctx.send_rows, ctx.recv_rows, ctx.group = send_rows, recv_rows, group
        return tuple(_all_to_all_rows(x, send_rows, recv_rows, group, zero_rows) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        n = sum(ctx.recv_rows)  # the trailing zero rows are constants: their gradient is dropped
        back = tuple(_all_to_all_rows(g[:n], ctx.recv_rows, ctx.send_rows, ctx.group) for g in grads)
        return (None, None, None, None, *back)


def all_to_all_rows(
    xs: Sequence[torch.Tensor],
    send_rows: Sequence[int],
    recv_rows: Sequence[int],
    group: ProcessGroup | None = None,
    zero_rows: int = 0,
) -> list[torch.Tensor]:
    """Differentiable ``all_to_all_single`` over dim 0 with uneven splits (rows per peer rank), for
    each tensor of ``xs`` in turn.

    Rank ``r`` sends rows ``[sum(send_rows[:p]), sum(send_rows[:p+1]))`` of each tensor to rank ``p``
    and receives ``recv_rows[p]`` rows from rank ``p``, concatenated in rank order, followed by
    ``zero_rows`` rows of zeros (a ready-made zero row for a gather that follows, without a copy).
    """
    for x in xs:
        if sum(send_rows) != x.shape[0]:
            raise ValueError(f"all_to_all_rows: send_rows {list(send_rows)} sum to {sum(send_rows)}, x has {x.shape[0]} rows")
    out = _AllToAll.apply(tuple(int(s) for s in send_rows), tuple(int(s) for s in recv_rows), group, int(zero_rows), *xs)
    return list(out)
