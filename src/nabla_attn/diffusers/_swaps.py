"""Processor swaps after ``apply_nabla``: keep NABLA, or say loudly that it stopped.

diffusers can replace our processors after apply_nabla: ``set_attn_processor``, CogVideoX's own
``fuse_qkv_projections`` (it installs its fused processor on every layer), a user's ``set_processor``;
CogVideoX's ``unfuse_qkv_projections`` puts back the processors it saved, i.e. our older wrappers.
Every such path ends in ``module.processor = new``, so an identity check per layer and forward (a
pointer compare each, in the eager pre-hook) sees all of them. ``set_attention_backend`` swaps
nothing: it sets ``_attention_backend``, which our processors forward to the original.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import _ModelState

log = logging.getLogger("nabla_attn.diffusers")


def _wrappable(state: "_ModelState", processor: Any) -> Any | None:
    """The processor our wrapper should hold, if NABLA can keep running on top of ``processor``: the
    model's own class (e.g. ``FusedCogVideoXAttnProcessor2_0`` after fusing) or an older wrapper of
    ours, unwrapped. None for anything else."""
    ours = state.family.processor_class  # every wrapper on this model is of the family's class
    while isinstance(processor, ours):
        processor = processor.original
    if type(processor).__name__ in state.family.original_processor_names:
        return processor
    return None


def runs_nabla(state: "_ModelState", name: str) -> bool:
    """Whether layer ``name`` still runs NABLA: our processor sits there, or one the next forward
    re-wraps. A layer whose processor was replaced by anything else does not (and has no stats)."""
    layer = state.layers[name]
    current = layer.module.processor
    return current is layer.wrapper or _wrappable(state, current) is not None


def sync_processors(state: "_ModelState") -> None:
    """Re-wrap layers whose processor was replaced by one of the model's own classes; raise for any
    other replacement rather than run that layer dense while the stats say sparse."""
    rewrapped: list[str] = []
    for name, layer in state.layers.items():
        current = layer.module.processor
        if current is layer.wrapper:
            continue
        original = _wrappable(state, current)
        if original is None:
            raise RuntimeError(
                f"{name}: its attention processor was replaced by {type(current).__name__} after apply_nabla, "
                f"so this layer would no longer run NABLA. NABLA can keep running only on top of "
                f"{', '.join(state.family.original_processor_names)}. Call remove_nabla(model) (it leaves "
                f"{type(current).__name__} in place), then apply_nabla again, with "
                f"NablaConfig(exclude_layers=[{name!r}]) to keep this layer's processor"
            )
        layer.original = original
        layer.wrapper = state.family.processor_class(original, state, name, layer.index)
        layer.module.set_processor(layer.wrapper)
        rewrapped.append(f"{name} ({type(original).__name__})")
    if rewrapped:
        log.info("nabla_attn: attention processors were replaced after apply_nabla; NABLA wraps the new ones: %s",
                 ", ".join(rewrapped))


def restore_processors(state: "_ModelState") -> None:
    """Put the model's own processors back where ours (or an older wrapper of ours) sit; a processor
    someone set after apply_nabla stays, being the most recent choice."""
    for layer in state.layers.values():
        current = layer.module.processor
        if current is layer.wrapper or isinstance(current, state.family.processor_class):
            layer.module.set_processor(_wrappable(state, current) or layer.original)
