"""NABLA for diffusers video transformers, in one call::

    from nabla_attn.diffusers import apply_nabla, remove_nabla, NablaConfig
    apply_nabla(pipe, NablaConfig(threshold=0.7, sta_window=(11, 3, 3), dense_steps=0))
    video = pipe(...).frames[0]
    remove_nabla(pipe)

Only video self-attention becomes sparse (cross-attention, audio and text streams stay dense).
``SUPPORTED_MODELS`` lists the transformer classes; docs/diffusers.md says what is sparse in each.
diffusers is an optional dependency (``pip install 'nabla-attn[diffusers]'``), imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..grid import VideoGrid
from ._config import NablaConfig

__all__ = [
    "NablaConfig", "NablaHandle", "NablaStats", "SUPPORTED_MODELS", "apply_nabla", "model_config", "nabla_stats",
    "remove_nabla",
]  # fmt: skip

SUPPORTED_MODELS = (
    "WanTransformer3DModel",
    "WanVACETransformer3DModel",
    "WanAnimateTransformer3DModel",
    "ChronoEditTransformer3DModel",
    "SkyReelsV2Transformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "HunyuanVideo15Transformer3DModel",
    "CogVideoXTransformer3DModel",
    "ConsisIDTransformer3DModel",
    "LTXVideoTransformer3DModel",
    "LTX2VideoTransformer3DModel",
    "Kandinsky5Transformer3DModel",
    "Kandinsky6SRTransformer3DModel",
)
# One module per family; each defines FAMILY (a _core.Family).
_FAMILY_MODULES = (
    "wan", "wan_vace", "wan_animate", "chronoedit", "skyreels_v2", "hunyuan_video", "hunyuan_video15",
    "cogvideox", "consisid", "ltx", "ltx2", "kandinsky5", "kandinsky6_sr",
)  # fmt: skip
_PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")


def _families() -> list[Any]:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "nabla_attn.diffusers needs diffusers: pip install 'nabla-attn[diffusers]'"
        ) from exc
    return [importlib.import_module(f"{__name__}.{m}").FAMILY for m in _FAMILY_MODULES]


def _family_of(model: Any, families: list[Any]) -> Any | None:
    for family in families:
        if isinstance(model, family.model_class):
            return family
    return None


def _transformers(target: Any) -> list[Any]:
    """The transformers of a pipeline (``transformer`` and, on Wan 2.2 A14B, ``transformer_2``), a
    list of transformers, or the model itself."""
    families = _families()
    if isinstance(target, (list, tuple)):
        return [m for t in target for m in _transformers(t)]
    if _family_of(target, families) is not None:
        return [target]
    found = [getattr(target, a) for a in _PIPELINE_TRANSFORMERS if getattr(target, a, None) is not None]
    if not found:
        raise TypeError(
            f"apply_nabla takes a diffusers pipeline or transformer; got {type(target).__name__}. "
            f"Supported transformers: {', '.join(SUPPORTED_MODELS)}"
        )
    for model in found:
        if _family_of(model, families) is None:
            raise TypeError(
                f"{type(target).__name__}'s transformer is a {type(model).__name__}, which NABLA does not support. "
                f"Supported transformers: {', '.join(SUPPORTED_MODELS)}"
            )
    return found


@dataclass(frozen=True)
class NablaStats:
    """Kept block density per self-attention layer (fraction of computed block pairs, text blocks
    included; 1.0 = dense). ``last`` is the most recent sparse forward, ``mean`` the average over
    all sparse forwards since ``apply_nabla`` (or ``reset_stats``). Dense layers and dense steps
    are not listed."""

    last: dict[str, float]
    mean: dict[str, float]
    step: int
    forwards: int

    @property
    def overall(self) -> float | None:
        """Mean of ``mean`` over layers (None before any sparse forward)."""
        return sum(self.mean.values()) / len(self.mean) if self.mean else None


class NablaHandle:
    """What :func:`apply_nabla` returns: the patched transformers and their shared state."""

    def __init__(self, models: list[Any], session: Any) -> None:
        self.models = models
        self._session = session

    @property
    def config(self) -> NablaConfig:
        return self._session.config

    @property
    def step(self) -> int:
        """Index of the current denoising step (-1 before the first forward)."""
        return self._session.step

    def reset_steps(self) -> None:
        """Start counting denoising steps again (done automatically when the timestep goes up)."""
        self._session.reset()

    def set_grid(self, grid: VideoGrid, sparse: bool = True) -> None:
        """Tell the processors the latent grid when calling transformer blocks directly (benchmarks):
        the transformer's forward normally records it. With forward-level tiling active (see
        ``NablaConfig.tiling``) the blocks then expect tiled hidden states, except the first, which tiles."""
        from ._core import configure_forward, state_of
        from ._swaps import sync_processors

        if not isinstance(grid, VideoGrid):
            raise TypeError(f"grid must be a nabla_attn.VideoGrid, got {type(grid).__name__}")
        for model in self.models:
            state = state_of(model)
            if state is not None:
                sync_processors(state)  # what the skipped pre-hook would have checked
                configure_forward(state, grid, sparse, next(model.parameters()).device)

    @property
    def tiled(self) -> bool:
        """Whether the last forward kept the hidden states tiled across blocks (``tiling``)."""
        from ._core import state_of

        return any(getattr(state_of(m), "tiled", False) for m in self.models)

    def stats(self) -> NablaStats:
        return nabla_stats(self.models)

    def reset_stats(self) -> None:
        from ._core import state_of

        for model in self.models:
            state = state_of(model)
            if state is not None:
                state.reset_stats()

    def remove(self) -> None:
        remove_nabla(self.models)


def model_config(target: Any) -> NablaConfig | None:
    """The NABLA settings a checkpoint defines itself (Kandinsky 5 with ``attention_type="nabla"``,
    Kandinsky 6 SR) as a :class:`NablaConfig`, or None where the model defines none."""
    families = _families()
    for model in _transformers(target):
        family = _family_of(model, families)
        if family.model_config is not None:
            config = family.model_config(model)
            if config is not None:
                return config
    return None


def apply_nabla(target: Any, config: NablaConfig | None = None) -> NablaHandle:
    """Replace the video self-attention of a diffusers pipeline's transformer(s), or of a transformer,
    with NABLA block-sparse attention. Returns a :class:`NablaHandle`.

    ``config=None``: the model's own NABLA settings where its config defines them (Kandinsky 5 NABLA
    checkpoints, Kandinsky 6 SR: see :meth:`NablaConfig.from_model`), else ``NablaConfig()``.

    Raises TypeError for an unsupported model (the message names the supported classes) and
    RuntimeError if NABLA is already applied.
    """
    from ._core import _Session, patch_model, unpatch_model

    models = _transformers(target)
    if config is None:
        config = model_config(models) or NablaConfig()
    if not isinstance(config, NablaConfig):
        raise TypeError(f"config must be a NablaConfig, got {type(config).__name__}")
    families = _families()
    session = _Session(config)
    done: list[Any] = []
    try:
        for model in models:
            patch_model(model, _family_of(model, families), session)
            done.append(model)
    except Exception:
        for model in done:  # all or nothing
            unpatch_model(model)
        raise
    return NablaHandle(models, session)


def _patched_models(target: Any) -> list[Any]:
    """The transformers behind a NablaHandle, a list of transformers, a pipeline or a transformer."""
    if isinstance(target, NablaHandle):
        return list(target.models)
    if isinstance(target, (list, tuple)):
        return list(target)
    return _transformers(target)


def remove_nabla(target: Any) -> None:
    """Restore the original attention processors and remove NABLA's hooks (the state dict was never
    changed). Accepts a pipeline, a transformer, a list of transformers or a NablaHandle."""
    from ._core import unpatch_model

    models = _patched_models(target)
    if not any([unpatch_model(m) for m in models]):
        raise ValueError(f"NABLA is not applied to this {type(target).__name__}")


def nabla_stats(target: Any) -> NablaStats:
    """Kept density per self-attention layer (see :class:`NablaStats`). With two experts (Wan 2.2)
    layer names are prefixed ``transformer.`` / ``transformer_2.``."""
    from ._core import state_of
    from ._swaps import runs_nabla

    models = _patched_models(target)
    last: dict[str, float] = {}
    mean: dict[str, float] = {}
    step, forwards = -1, 0
    states = [(m, state_of(m)) for m in models]
    if all(s is None for _, s in states):
        raise ValueError("NABLA is not applied to this model; call apply_nabla first")
    for i, (_, state) in enumerate(states):
        if state is None:
            continue
        prefix = "" if len(models) == 1 else f"{_PIPELINE_TRANSFORMERS[i] if i < 2 else f'model{i}'}."
        if state.stats is not None:
            for name, (latest, total, n) in zip(state.names, state.stats.tolist()):
                if n > 0 and runs_nabla(state, name):  # a replaced processor runs no NABLA: no density
                    last[prefix + name] = latest
                    mean[prefix + name] = total / n
        step, forwards = state.session.step, state.session.forwards
    return NablaStats(last=last, mean=mean, step=step, forwards=forwards)
