"""What a backend is: what it supports, how it tiles and builds its mask on its device, its attention.

A backend works on tiled tensors (``[B, H, tiled_len, D]``, see :mod:`nabla_attn.grid`) and block
tables (:class:`~nabla_attn.masks.BlockSparseMask`); none knows about models. The defaults here are
the eager definitions, so a backend overrides only what it does faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..grid import TokenLayout
from ..masks import BlockSparseMask, MaskSpec, mask_from_means
from . import tiling


@dataclass(frozen=True)
class Request:
    """What a call needs, as plain values (so a backend choice can be cached and is constant under
    ``torch.compile``): the tensors' device and dtype, q's and v's head dims, whether a backward
    pass follows, and the query-block size."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    v_head_dim: int
    needs_grad: bool
    query_block: int

    @staticmethod
    def of(q: torch.Tensor, v: torch.Tensor, query_block: int) -> "Request":
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
        return Request(q.device, q.dtype, q.shape[-1], v.shape[-1], needs_grad, query_block)


class Backend:
    """Block-sparse attention on tiled tensors. Subclasses set ``name`` and override what they do
    faster than the eager definitions; :mod:`nabla_attn.backends` registers them."""

    name = ""
    fallback = "backend='reference'"

    def unsupported(self, req: Request) -> str | None:
        """Why this backend cannot run ``req`` (None when it can)."""
        return None

    def auto_candidate(self, req: Request) -> bool:
        """Whether ``backend="auto"`` considers this backend for ``req`` (in registry order)."""
        return True

    def fast_tiling(self, x: torch.Tensor) -> bool:
        """Whether tiling ``x`` runs the GPU permutation kernel (else the eager gather)."""
        return False

    def tile(self, x: torch.Tensor, layout: TokenLayout, *, pool: bool = False,
             dim: int = -2) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Natural -> tiled order along ``dim``; with ``pool`` also the float32 video-block means of
        ``[B, H, S, D]`` where the tiling kernel can write them on the way (else None)."""
        return tiling.tile(x, layout, dim=dim, kernel=self.fast_tiling(x), pool=pool)

    def untile(self, x: torch.Tensor, layout: TokenLayout, like: torch.Tensor | None = None,
               dim: int = -2) -> torch.Tensor:
        return tiling.untile(x, layout, dim=dim, kernel=self.fast_tiling(x), like=like)

    def build_mask(self, qt: torch.Tensor, kt: torch.Tensor, layout: TokenLayout, spec: MaskSpec,
                   means: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[BlockSparseMask, Any]:
        """NABLA's table for tiled q, k (``means``: their block means, when tiling wrote them) and
        whatever this backend's attention derives from it (passed back to :meth:`attention`)."""
        mask = tiling.reference_mask(qt, kt, layout, spec)
        return mask, self.plan(mask)

    def mask_from_means(self, qa: torch.Tensor, ka: torch.Tensor, layout: TokenLayout,
                        spec: MaskSpec) -> tuple[BlockSparseMask, Any]:
        """The table from float32 video-block means ``[B, H, Nv, D]`` (the distributed path pools itself)."""
        mask = mask_from_means(qa, ka, layout, spec, qa.device)
        return mask, self.plan(mask)

    def plan(self, mask: BlockSparseMask) -> Any:
        """What :meth:`attention` derives from a table (kv lists, ...), built fresh from ``mask.kept``."""
        return None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, plan: Any,
                  scale: float) -> torch.Tensor:
        raise NotImplementedError

    def attention_natural(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                          plan: Any, scale: float, like: torch.Tensor) -> torch.Tensor:
        """:meth:`attention` on tiled q, k, v with the output in natural order and ``like``'s memory
        layout (:meth:`untile`); a backend whose kernel can write natural order overrides this."""
        return self.untile(self.attention(q, k, v, mask, plan, scale), mask.layout, like=like)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockSparseMask, float], torch.Tensor]


def eager_attention_op(qualname: str, attend: Attend) -> Callable[..., torch.Tensor]:
    """``attend(q, k, v, mask, scale)``, an eager differentiable function, as a ``torch.library``
    custom op on plain arguments (the table, the layout's key): a fake implementation for
    ``torch.compile``, and a backward that recomputes ``attend`` under autograd (so nothing but the
    inputs is saved). The reference and CPU backends share this wrapping."""

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, layout: Sequence[int],
           query_block: int, scale: float) -> torch.Tensor:
        mask = BlockSparseMask(kept, TokenLayout.from_key(layout), query_block)
        with torch.no_grad():
            return attend(q, k, v, mask, scale).contiguous()

    custom = torch.library.custom_op(qualname, op, mutates_args=())

    @custom.register_fake
    def _(q, k, v, kept, layout, query_block, scale):  # type: ignore[no-untyped-def]
        return q.new_empty(*q.shape[:3], v.shape[-1])

    def setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        q, k, v, kept, ctx.layout, ctx.query_block, ctx.scale = inputs
        ctx.save_for_backward(q, k, v, kept)

    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        q, k, v, kept = ctx.saved_tensors
        mask = BlockSparseMask(kept, TokenLayout.from_key(ctx.layout), ctx.query_block)
        inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            out = attend(*inputs, mask, ctx.scale)
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (*(next(grads) if x.requires_grad else None for x in inputs), None, None, None, None)

    custom.register_autograd(backward, setup_context=setup)
    return custom
