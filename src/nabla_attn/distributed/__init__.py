"""Multi-GPU NABLA: Ulysses sequence parallelism over any ``torch.distributed`` process group.

    from nabla_attn.distributed import ulysses_nabla_attention
    out = ulysses_nabla_attention(q_shard, k_shard, v_shard, grid, threshold=0.7, group=group)

See ``docs/distributed.md`` for the sharding convention, load balancing and the diffusers / xDiT hookups.
"""

from .comm import all_to_all_rows
from .integrations import diffusers_nabla_attention, diffusers_ulysses_group, xfuser_attn_processor
from .partition import balance_heads, contiguous_heads, even_head_counts, rank_loads, shard_sizes
from .timing import PhaseTimer
from .ulysses import UlyssesInfo, ulysses_nabla_attention

__all__ = [
    "PhaseTimer",
    "UlyssesInfo",
    "all_to_all_rows",
    "balance_heads",
    "contiguous_heads",
    "diffusers_nabla_attention",
    "diffusers_ulysses_group",
    "even_head_counts",
    "rank_loads",
    "shard_sizes",
    "ulysses_nabla_attention",
    "xfuser_attn_processor",
]
