"""Collectives used by the Ulysses path: a differentiable all-to-all with uneven splits (synchronous,
or started and waited on separately so it overlaps compute), group helpers.

Every collective here is called by every rank of the group in the same order with matching sizes;
the callers derive all sizes from arguments that are equal on every rank (sequence shard sizes, the
head assignment) so no rank can skip or reorder a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _recv_buffer(x: torch.Tensor, recv_rows: Sequence[int], zero_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A receive buffer of ``sum(recv_rows) + zero_rows`` rows (the trailing ones zeroed) and its
    leading ``sum(recv_rows)`` rows, which the collective writes."""
    n = int(sum(recv_rows))
    buf = x.new_empty((n + zero_rows, *x.shape[1:]))
    if zero_rows:
        buf[n:].zero_()
    return buf, buf[:n]


def _all_to_all_rows(
    x: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], group: ProcessGroup | None, zero_rows: int = 0
) -> torch.Tensor:
    """all_to_all_single along dim 0: send ``send_rows[p]`` leading rows to rank p, receive ``recv_rows[p]`` from it."""
    x = x.contiguous()
    buf, out = _recv_buffer(x, recv_rows, zero_rows)
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


def _check_rows(xs: Sequence[torch.Tensor], send_rows: Sequence[int]) -> None:
    for x in xs:
        if sum(send_rows) != x.shape[0]:
            raise ValueError(f"all_to_all_rows: send_rows {list(send_rows)} sum to {sum(send_rows)}, x has {x.shape[0]} rows")


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
    _check_rows(xs, send_rows)
    out = _AllToAll.apply(tuple(int(s) for s in send_rows), tuple(int(s) for s in recv_rows), group, int(zero_rows), *xs)
    return list(out)


# ----------------------------------------------------------------------------------------------
# Asynchronous all-to-all: started in one autograd node, waited on in another


class _Pending:
    """One all-to-all of several tensors in flight (``async_op=True``): the Work handles and every
    tensor the transfers read or write, kept alive until :meth:`wait` (on CUDA the caching
    allocator could otherwise hand a send buffer to the compute stream while NCCL still reads it).

    Used twice: the forward transfer (``send_rows`` out, ``recv_rows`` in, ``zero_rows`` zero rows
    after the received ones) and, in backward, its adjoint (the splits swapped, no zero rows).
    """

    def __init__(self, send_rows: Sequence[int], recv_rows: Sequence[int], group: ProcessGroup | None, zero_rows: int) -> None:
        self.send_rows = tuple(int(s) for s in send_rows)
        self.recv_rows = tuple(int(s) for s in recv_rows)
        self.group = group
        self.zero_rows = int(zero_rows)
        self._works: list[object] = []
        self._keep: list[torch.Tensor] = []
        self._bufs: list[torch.Tensor] | None = None

    def start(self, xs: Sequence[torch.Tensor], backward: bool = False) -> list[torch.Tensor]:
        if self._bufs is not None:
            raise RuntimeError("an all-to-all was started twice without a wait in between")
        send, recv = (self.recv_rows, self.send_rows) if backward else (self.send_rows, self.recv_rows)
        zero_rows = 0 if backward else self.zero_rows
        bufs = []
        for x in xs:
            x = x.contiguous()
            buf, out = _recv_buffer(x, recv, zero_rows)
            # Issued on every rank even when it sends and receives nothing (see _all_to_all_rows).
            work = dist.all_to_all_single(out, x, output_split_sizes=list(recv), input_split_sizes=list(send),
                                          group=self.group, async_op=True)  # fmt: skip
            self._works.append(work)
            self._keep += [x, buf]
            bufs.append(buf)
        self._bufs = bufs
        return bufs

    def wait(self) -> list[torch.Tensor]:
        """Wait for the transfers (on CUDA: the current stream waits; the host does not block) and
        return the receive buffers."""
        if self._bufs is None:
            raise RuntimeError("waiting on an all-to-all that was not started")
        for work in self._works:
            work.wait()  # type: ignore[attr-defined]
        bufs = self._bufs
        self._works, self._keep, self._bufs = [], [], None
        return bufs


class _Start(torch.autograd.Function):
    """Forward: start the all-to-all of ``xs``; returns the receive buffers (not filled until the
    matching :class:`_Wait`) and an empty token. Backward: wait for the adjoint transfer that
    ``_Wait.backward`` started and return the received gradients."""

    @staticmethod
    def forward(ctx, pending: _Pending, *xs: torch.Tensor):  # type: ignore[override]
        ctx.pending = pending
        bufs = pending.start(xs)
        return (*bufs, xs[0].new_empty(0))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        # grads (for the buffers and the token) are placeholders; the real ones are in flight.
        return (None, *ctx.pending.wait())


class _Wait(torch.autograd.Function):
    """Forward: wait for the all-to-all and return its buffers (and an empty token). Backward:
    start the adjoint all-to-all of the incoming gradients (splits swapped; every rank joins, with
    zeros for unused outputs) and return at once, so it overlaps whatever backward runs next.

    Extra ``after`` inputs (tokens of other start/wait nodes) only order the backward: the nodes
    that produced them run their backward after this one's."""

    @staticmethod
    def forward(ctx, pending: _Pending, n: int, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.pending, ctx.n, ctx.n_after = pending, n, len(tensors) - n
        pending.wait()
        return (*tensors[:n], tensors[0].new_empty(0))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        pending, bufs = ctx.pending, grads[: ctx.n]
        rows = sum(pending.recv_rows)  # the trailing zero rows are constants: their gradient is dropped
        pending.start([g[:rows] for g in bufs], backward=True)
        return (None, None, *bufs, *([None] * ctx.n_after))


class _WaitScatter(torch.autograd.Function):
    """Forward: wait for several all-to-alls (one tensor each, no zero rows) and write the received
    rows of transfer i at rows ``index[i]`` of one ``[total, ...]`` tensor. Backward: start every
    adjoint transfer (last first) from those rows of the gradient; each start node waits for its own."""

    @staticmethod
    def forward(ctx, pendings: tuple[_Pending, ...], index: tuple[torch.Tensor, ...], total: int, *bufs: torch.Tensor):  # type: ignore[override]
        ctx.pendings, ctx.index = pendings, index
        ctx.shapes = [b.shape for b in bufs]
        out = bufs[0].new_empty((total, *bufs[0].shape[1:]))
        for pending, idx, buf in zip(pendings, index, bufs):
            pending.wait()
            out.index_copy_(0, idx, buf)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        for i in reversed(range(len(ctx.pendings))):
            ctx.pendings[i].start([grad.index_select(0, ctx.index[i])], backward=True)
        placeholders = [grad.new_zeros(()).expand(shape) for shape in ctx.shapes]
        return (None, None, None, *placeholders)


@dataclass
class InFlight:
    """An all-to-all started by :func:`start_all_to_all_rows`: its receive buffers are not valid
    until :func:`wait_all_to_all_rows` (or :func:`wait_all_to_all_rows_into`) returns them."""

    pending: _Pending
    bufs: tuple[torch.Tensor, ...]
    token: torch.Tensor


def start_all_to_all_rows(
    xs: Sequence[torch.Tensor],
    send_rows: Sequence[int],
    recv_rows: Sequence[int],
    group: ProcessGroup | None = None,
    zero_rows: int = 0,
) -> InFlight:
    """:func:`all_to_all_rows`, started with ``async_op=True``; wait with :func:`wait_all_to_all_rows`.

    Differentiable like :func:`all_to_all_rows`: all tensors of the transfer live in one start node
    and one wait node. In backward the wait node starts the adjoint transfer and the start node
    waits for it, so compute that runs in between overlaps it. Every rank must start and wait in
    the same order (the backward order is fixed by the ``after`` tokens of the waits).
    """
    _check_rows(xs, send_rows)
    pending = _Pending(send_rows, recv_rows, group, zero_rows)
    *bufs, token = _Start.apply(pending, *xs)
    return InFlight(pending, tuple(bufs), token)


def wait_all_to_all_rows(flight: InFlight, after: Sequence[torch.Tensor] = ()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Wait for ``flight``; returns its receive buffers (laid out as :func:`all_to_all_rows` returns
    them) and a token.

    ``after``: tokens of other starts or waits whose backward must run after this wait's backward
    (which starts the adjoint transfer). Passing the previous wait's token makes the adjoint
    transfers start in a fixed order on every rank whatever the autograd engine schedules; passing
    the next transfer's start token makes that start node wait for its gradients only after this
    wait's backward, i.e. after the compute between the two.
    """
    *bufs, token = _Wait.apply(flight.pending, len(flight.bufs), *flight.bufs, *after)
    return list(bufs), token


def wait_all_to_all_rows_into(flights: Sequence[InFlight], index: Sequence[torch.Tensor], total_rows: int) -> torch.Tensor:
    """Wait for several one-tensor transfers (no zero rows) and place transfer ``i``'s received rows at
    rows ``index[i]`` (int64, on the tensors' device) of one ``[total_rows, ...]`` tensor; rows no
    index names are left uninitialised. Differentiable; backward starts the adjoint transfers of
    every flight in one node, last first."""
    if len(flights) != len(index) or any(len(f.bufs) != 1 or f.pending.zero_rows for f in flights):
        raise ValueError("wait_all_to_all_rows_into takes one index per flight and one tensor per flight without zero rows")
    for f, idx in zip(flights, index):
        if idx.numel() != f.bufs[0].shape[0]:
            raise ValueError(f"index of {idx.numel()} rows for a transfer that receives {f.bufs[0].shape[0]}")
    return _WaitScatter.apply(tuple(f.pending for f in flights), tuple(index), int(total_rows), *(f.bufs[0] for f in flights))
