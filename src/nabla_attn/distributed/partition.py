"""How the sequence and the heads are split over the ranks of a Ulysses group.

Sequence: contiguous shards of the natural (frame-major, text included) sequence, rank 0 first.
The default sizes follow ``torch.tensor_split`` (diffusers' context-parallel sharder and its
"ulysses anything" mode): the first ``S % P`` ranks hold one token more than the rest. Any other
contiguous split can be passed as explicit sizes; :func:`shard_sizes` also builds ``"chunk"``
sizes (``torch.chunk``: ``ceil(S / P)`` tokens per rank, the last ranks shorter or empty).

Heads: after the first all-to-all each rank attends over the full sequence for a *list* of heads.
Without balancing the lists are contiguous runs of as-equal-as-possible length; with balancing the
list lengths stay the same (so every rank keeps the same tensor shapes, buffers and compiled
kernels from call to call) and only which heads go where changes, chosen by greedy
longest-processing-time on each head's kept-block count.
"""

from __future__ import annotations

from typing import Literal, Sequence

SplitMode = Literal["tensor_split", "chunk"]


def shard_sizes(seq_len: int, world_size: int, mode: SplitMode = "tensor_split") -> list[int]:
    """Tokens per rank for a contiguous split of ``seq_len`` tokens over ``world_size`` ranks.

    ``"tensor_split"``: ``torch.tensor_split`` sizes (first ``seq_len % world_size`` ranks one longer).
    ``"chunk"``: ``torch.chunk`` sizes padded out with empty shards (``ceil(seq_len/world_size)``
    each, the last non-empty shard shorter, any later ones empty).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    if mode == "tensor_split":
        base, extra = divmod(seq_len, world_size)
        return [base + (1 if r < extra else 0) for r in range(world_size)]
    if mode == "chunk":
        c = -(-seq_len // world_size)
        return [max(0, min(c, seq_len - r * c)) for r in range(world_size)]
    raise ValueError(f"mode must be 'tensor_split' or 'chunk', got {mode!r}")


def check_shard_sizes(sizes: Sequence[int], seq_len: int, world_size: int) -> list[int]:
    values = [int(s) for s in sizes]
    if len(values) != world_size or any(s < 0 for s in values) or sum(values) != seq_len:
        raise ValueError(
            f"shard_sizes {list(sizes)} must be {world_size} non-negative sizes (one per rank) summing to the "
            f"sequence length {seq_len}"
        )
    return values


def even_head_counts(num_heads: int, world_size: int) -> list[int]:
    """Heads per rank, as equal as possible (the first ``num_heads % world_size`` ranks one more)."""
    base, extra = divmod(num_heads, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def contiguous_heads(num_heads: int, world_size: int) -> list[list[int]]:
    """The plain Ulysses split: rank r gets a contiguous run of heads."""
    out, start = [], 0
    for n in even_head_counts(num_heads, world_size):
        out.append(list(range(start, start + n)))
        start += n
    return out


def balance_heads(costs: Sequence[float], world_size: int, capacities: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy longest-processing-time assignment of heads to ranks with a fixed head count per rank.

    Heads are taken in decreasing cost (ties: lower head index first) and each goes to the rank with
    the smallest load that still has room (ties: lower rank). ``capacities`` defaults to
    :func:`even_head_counts`, so every rank keeps the tensor shapes of the unbalanced split.
    Deterministic: every rank computes the same answer from the same costs. Each returned list is
    sorted ascending.
    """
    H = len(costs)
    caps = list(capacities) if capacities is not None else even_head_counts(H, world_size)
    if len(caps) != world_size or sum(caps) != H or any(c < 0 for c in caps):
        raise ValueError(f"capacities {caps} must give {world_size} non-negative head counts summing to {H}")
    order = sorted(range(H), key=lambda h: (-float(costs[h]), h))
    load = [0.0] * world_size
    room = list(caps)
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for h in order:
        best = min((r for r in range(world_size) if room[r] > 0), key=lambda r: (load[r], r))
        assigned[best].append(h)
        load[best] += float(costs[h])
        room[best] -= 1
    return [sorted(a) for a in assigned]


def rank_loads(assignment: Sequence[Sequence[int]], costs: Sequence[float]) -> list[float]:
    """Total cost per rank under an assignment."""
    return [float(sum(float(costs[h]) for h in heads)) for heads in assignment]
