"""Index maps between the per-rank padded chunks of a Ulysses all-to-all and the tiled layout,
cached per layout, split and device."""

from __future__ import annotations

import functools

import torch

from ..cache import DeviceCache
from ..constants import TILE
from ..grid import TokenLayout

@functools.lru_cache(maxsize=32)
def slot_maps(layout: TokenLayout, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where tokens sit when the all-to-all delivers the sequence as ``P`` chunks of ``c = max(sizes)`` slots.

    Chunk p holds natural tokens ``offset_p .. offset_p + sizes[p] - 1``, then padding. Returns
    ``slot_of_tiled`` (int64 ``[tiled_len]``: the chunk slot ``p * c + j`` of each tiled position,
    -1 for tiled padding), ``tiled_of_slot`` (int64 ``[P * c]``: the tiled position of each slot, -1
    for chunk padding) and ``slot_valid`` (bool ``[P, c]``).
    """
    P, c, S = len(sizes), max(sizes), layout.seq_len
    slot_of_natural = torch.empty(S, dtype=torch.int64)
    natural_of_slot = torch.full((P * c,), S, dtype=torch.int64)
    offset = 0
    for p, n in enumerate(sizes):
        slot_of_natural[offset : offset + n] = torch.arange(p * c, p * c + n)
        natural_of_slot[p * c : p * c + n] = torch.arange(offset, offset + n)
        offset += n
    gather = layout.gather_index()  # tiled -> natural (S = padding)
    scatter = layout.scatter_index()  # natural -> tiled
    slot_of_tiled = torch.cat([slot_of_natural, torch.tensor([-1])])[gather]
    tiled_of_slot = torch.cat([scatter, torch.tensor([-1])])[natural_of_slot]
    return slot_of_tiled, tiled_of_slot, (natural_of_slot < S).view(P, c)


_GATHERS: DeviceCache[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]] = DeviceCache(64)
# Tokens per gather row when whole 8-token tile rows move together (see as_segments).
SEGMENT = TILE


def as_segments(idx: torch.Tensor) -> torch.Tensor | None:
    """``idx`` as indices of 8-row segments, if it moves whole aligned segments (else None).

    Both gathers around the attention move tokens in runs of 8 (a tile row is 8 consecutive tokens
    in the natural order and in the tiled order) whenever the grid width, the text length and the
    shard offsets are multiples of 8 (Wan 720p on 2 or 4 GPUs, for example). Gathering 8-token
    rows (2 KiB at head_dim 128 in bf16) instead of single tokens (256 B) runs much closer to copy
    bandwidth than ``index_select`` on 256-byte rows.
    """
    if idx.numel() % SEGMENT:
        return None
    v = idx.view(-1, SEGMENT)
    first = v[:, 0]
    if bool((first % SEGMENT != 0).any()) or not torch.equal(v, first[:, None] + torch.arange(SEGMENT)):
        return None
    return first // SEGMENT


def gathers(
    layout: TokenLayout, sizes: tuple[int, ...], h_r: int, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Row indices of the two gathers around the attention, cached per shape and device.

    ``gather_in`` reads the received buffer ``[P, h_r, B, c]`` rows (plus a zero slab of ``B * c``
    rows at the end) into ``[B, h_r, tiled_len]`` order; ``gather_out`` reads the attention output
    ``[B, h_r, tiled_len]`` rows into send order ``[P, h_r, B, c]``. The two ints are the tokens per
    gathered row (8 when :func:`as_segments` applies, else 1); the indices count such rows.
    """
    return _GATHERS.get((layout, sizes, h_r, batch), device, lambda: _build_gathers(layout, sizes, h_r, batch, device))


def _build_gathers(
    layout: TokenLayout, sizes: tuple[int, ...], h_r: int, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    slot_of_tiled, tiled_of_slot, slot_valid = slot_maps(layout, sizes)
    P, c, T, B = len(sizes), max(sizes), layout.tiled_len, batch
    b = torch.arange(B).view(B, 1, 1)
    h = torch.arange(h_r).view(1, h_r, 1)
    p_t, j_t = slot_of_tiled // c, slot_of_tiled % c  # [T]
    rows_in = ((p_t * h_r + h) * B + b) * c + j_t  # [B, h_r, T]
    zero_row = P * h_r * B * c
    # Tiled padding reads the zero slab; 8 consecutive zero rows where the slab has them, so that
    # padded tile rows still form whole segments.
    pad_rows = zero_row + (torch.arange(T) % SEGMENT if B * c >= SEGMENT else torch.zeros(T, dtype=torch.int64))
    gather_in = torch.where(slot_of_tiled >= 0, rows_in, pad_rows.expand_as(rows_in)).reshape(-1)
    # Chunk padding slots read some output row (the receiver drops or zeroes them): row j % 8, so
    # whole padded segments stay segments.
    slot = torch.arange(P * c)
    tiled = torch.where(tiled_of_slot >= 0, tiled_of_slot, slot % SEGMENT).view(P, 1, 1, c)
    h4 = torch.arange(h_r).view(1, h_r, 1, 1)
    b4 = torch.arange(B).view(1, 1, B, 1)
    gather_out = ((b4 * h_r + h4) * T + tiled).reshape(-1)  # [P, h_r, B, c]
    # The gathered buffers must also split into whole segments: the received one holds
    # (P * h_r + 1) * B * c rows (zero slab included), the attention output B * h_r * T.
    seg_in = as_segments(gather_in) if h_r and ((P * h_r + 1) * B * c) % SEGMENT == 0 else None
    seg_out = as_segments(gather_out) if h_r else None
    n_in = SEGMENT if seg_in is not None else 1
    n_out = SEGMENT if seg_out is not None else 1
    gather_in = seg_in if seg_in is not None else gather_in
    gather_out = seg_out if seg_out is not None else gather_out
    return gather_in.to(device), gather_out.to(device), slot_valid.to(device), n_in, n_out
