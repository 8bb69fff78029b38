"""Model-independent machinery of ``apply_nabla``: per-model state, the transformer pre-hook that
records the latent grid and counts denoising steps, the sparse-attention call every processor
shares, stats, and exact removal.

Why a pre-hook and shared state: attention processors only see flattened token sequences, so the
video grid (frames x height x width after patchify) must come from the transformer's own inputs. The
hook runs eagerly (``torch._dynamo.disable``) so that reading the timestep never enters a compiled
graph; compiled code only reads the grid (ints) and two bools (sparse step, forward-level tiling), so
steps never trigger a recompile. The NABLA op itself is traced: tiling, mask and attention are
``torch.library`` custom ops, so a compiled block has no graph break from us.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..attention import nabla_attention
from ..constants import TILE
from ..grid import TokenLayout, VideoGrid
from ._config import NablaConfig
from ._perhead import HeadSpec, head_attention
from ._perlayer import resolve_layer_specs
from ._reuse import reuse_attention
from ._swaps import restore_processors, sync_processors

log = logging.getLogger("nabla_attn.diffusers")


class _Session:
    """State shared by all transformers of one ``apply_nabla`` call (both Wan 2.2 experts count
    the same denoising steps)."""

    def __init__(self, config: NablaConfig) -> None:
        self.config = config
        self.step = -1
        self.last_timestep: float | None = None
        self.forwards = 0

    def observe(self, timestep: float | None) -> None:
        """Advance the step counter for one transformer forward.

        A new step starts when the timestep value changes; forwards at the same timestep (the
        conditional and unconditional passes of unbatched classifier-free guidance, or the two
        halves of a batched one) belong to one step. A timestep *larger* than the previous one means
        a new generation (schedulers count down), so the counter restarts at step 0.
        """
        self.forwards += 1
        if timestep is None:
            self.step += 1
        elif self.last_timestep is None or timestep > self.last_timestep:
            self.step = 0
        elif timestep != self.last_timestep:
            self.step += 1
        self.last_timestep = timestep

    def reset(self) -> None:
        self.step = -1
        self.last_timestep = None


@dataclass
class _Layer:
    """One patched attention module: the processor it had (the one dense steps call) and ours."""

    module: torch.nn.Module
    original: Any
    wrapper: "NablaProcessorBase"
    index: int  # row in ``_ModelState.stats``


@dataclass
class _ModelState:
    session: _Session
    family: "Family"
    grid: VideoGrid | None = None
    batch: int = 0
    sparse_now: bool = True
    # Forward-level tiling (tiling="forward"/"auto"): set per forward by the pre-hook.
    tiled: bool = False
    layout: TokenLayout | None = None
    layers: dict[str, _Layer] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    # Patched layer names in order, and per layer (last density, sum of densities, sparse forwards),
    # float32 on the model's device: updated in place, so no host sync inside the forward and no
    # Python value for torch.compile to guard on.
    names: list[str] = field(default_factory=list)
    stats: torch.Tensor | None = None
    # Per-layer masks from ``NablaConfig.layer_thresholds``, resolved once at apply time (name -> spec);
    # layers not named use the config's own spec.
    specs: dict[str, Any] = field(default_factory=dict)

    def ensure_stats(self, device: torch.device) -> None:
        if self.stats is None or self.stats.device != device:
            self.stats = torch.zeros(len(self.names), 3, device=device)

    def record(self, index: int, density: torch.Tensor) -> None:
        stats = self.stats
        assert stats is not None, "ensure_stats runs in the transformer's pre-hook"
        density = density.detach().to(stats.dtype)
        stats[index, 0] = density
        stats[index, 1] += density
        stats[index, 2] += 1

    def reset_stats(self) -> None:
        if self.stats is not None:
            self.stats.zero_()


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelState]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Family:
    """How one diffusers model class is patched."""

    name: str
    model_class: type
    # self-attention modules in execution order: (qualified name, module)
    attention_layers: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]
    # (grid, batch, timestep value or None) from the bound forward arguments; grid None: this forward
    # cannot be mapped onto a grid (LTX-2 called with coordinates only) and runs dense.
    read_inputs: Callable[[torch.nn.Module, inspect.BoundArguments], tuple[VideoGrid | None, int, float | None]]
    processor_class: type
    # Class names of the processors our processor can wrap (the model's own, fused variants included).
    original_processor_names: tuple[str, ...]
    # Installs the hooks that keep hidden states tiled from the first block to the last (returns
    # their handles); None where the family tiles per layer only.
    install_forward_tiling: Callable[[torch.nn.Module, "_ModelState"], list[Any]] | None = None
    # The model's own NABLA settings (Kandinsky's config) as a NablaConfig, None where it has none.
    model_config: Callable[[torch.nn.Module], NablaConfig | None] | None = None


class NablaProcessorBase:
    """Wraps a model's original attention processor. Dense steps call the original unchanged; sparse
    steps run the family's own projections/norms/RoPE and NABLA instead of dense attention."""

    def __init__(self, original: Any, state: _ModelState, name: str, index: int = 0) -> None:
        self.original = original
        self.state = state
        self.name = name
        self.index = index  # row of this layer in ``state.stats``
        self.pending: list[torch.Tensor] = []

    # Subclasses define ``__call__`` with the original processor's explicit parameter names:
    # diffusers' ``Attention.forward`` drops keyword arguments a processor's signature does not name.

    # diffusers' ``enable_parallelism`` configures every processor that has these attributes. They
    # live on the original processor, so its dense steps run context-parallel too, whichever of
    # apply_nabla and enable_parallelism came first.
    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config: Any) -> None:
        self.original._parallel_config = config

    # ``set_attention_backend`` / ``reset_attention_backend`` assign this on every processor that has
    # it: forward it to the original, so dense steps and layers we do not touch follow the user's
    # backend. An original without the attribute (Kandinsky 6 SR's processor) raises AttributeError
    # here too, so diffusers' ``hasattr`` check skips this processor as it skipped the original.
    @property
    def _attention_backend(self) -> Any:
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self.original._attention_backend = backend

    def sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_tokens: int, text_position: str,
        record: bool = True, tiled: bool | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """NABLA attention on ``[B, H, S, D]`` q, k, v in the model's natural token order, or in tiled
        order where our forward-level tiling or the model itself (``tiled=True``: Kandinsky's fractal
        order) put them. With ``record=False`` the kept density is left in ``self.pending`` for the
        caller to combine."""
        state = self.state
        grid = state.grid
        if grid is None:
            raise RuntimeError(
                f"{self.name}: NABLA does not know the video grid. Call the transformer itself (its forward "
                "records the grid), or set it with NablaHandle.set_grid(VideoGrid(...)) before calling blocks directly."
            )
        tiled = state.tiled if tiled is None else tiled
        group = _ulysses_group(self._parallel_config)
        if group is not None:
            if tiled:
                raise ValueError(
                    f"{self.name}: tiling once per forward does not combine with context parallelism; "
                    "use NablaConfig(tiling='layer') (or 'auto')"
                )
            return _sparse_ulysses(self, q, k, v, grid, text_tokens, text_position, record, group)
        if tiled:
            return _sparse(self, q, k, v, grid, text_tokens, text_position, record, "tiled")
        expected = grid.num_tokens + text_tokens
        if q.shape[2] != expected:
            raise ValueError(
                f"{self.name}: self-attention sees {q.shape[2]} tokens, but the transformer's inputs give a "
                f"{grid.frames}x{grid.height}x{grid.width} grid ({grid.num_tokens} video tokens) + {text_tokens} text tokens"
            )
        return _sparse(self, q, k, v, grid, text_tokens, text_position, record, "natural")


def _sparse(
    proc: NablaProcessorBase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    grid: VideoGrid, text_tokens: int, text_position: str, record: bool, token_order: str,
) -> torch.Tensor:  # fmt: skip
    state = proc.state
    cfg = state.session.config
    spec = state.specs.get(proc.name) or cfg.mask_spec
    if cfg.mask_reuse_steps > 1:  # opt-in; eager (a graph break per layer under torch.compile)
        out, mask = reuse_attention(proc, q, k, v, grid, text_tokens, text_position, token_order, spec)
    elif isinstance(spec, HeadSpec):  # one threshold per head (layer_thresholds lists)
        out, mask = head_attention(q, k, v, grid, text_tokens, text_position, token_order, spec, cfg.backend, proc.name,
                                   cfg.precision)
    else:
        out, mask = nabla_attention(
            q, k, v, grid, spec.threshold, spec.sta_window, text_tokens, text_position,
            backend=cfg.backend, query_block=spec.query_block, token_order=token_order, return_mask=True,
            precision=cfg.precision,
        )  # fmt: skip
    if cfg.collect_stats:
        density = mask.kept.float().mean()
        if record:
            state.record(proc.index, density)
        else:
            proc.pending.append(density)
    return out


def _ulysses_group(parallel_config: Any) -> Any:
    if parallel_config is None:
        return None
    from ..distributed.integrations import diffusers_ulysses_group

    return diffusers_ulysses_group(parallel_config)


@torch._dynamo.disable
def _sparse_ulysses(
    proc: NablaProcessorBase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    grid: VideoGrid, text_tokens: int, text_position: str, record: bool, group: Any,
) -> torch.Tensor:  # fmt: skip
    """Context-parallel (Ulysses) model: q, k, v are this rank's sequence shard; NABLA runs over the
    whole sequence for the heads assigned to this rank. Stats cover this rank's heads."""
    from ..distributed import ulysses_nabla_attention

    cfg = proc.state.session.config
    if cfg.mask_reuse_steps > 1:
        raise ValueError(f"{proc.name}: mask_reuse_steps > 1 is not supported with context parallelism")
    spec = proc.state.specs.get(proc.name) or cfg.mask_spec
    if isinstance(spec, HeadSpec):
        raise ValueError(f"{proc.name}: per-head thresholds are not supported with context parallelism")
    if cfg.precision != "bf16":
        raise ValueError(f"{proc.name}: precision={cfg.precision!r} is not supported with context parallelism")
    out, info = ulysses_nabla_attention(
        q, k, v, grid, spec.threshold, spec.sta_window, text_tokens, text_position,
        group=group, backend=cfg.backend, query_block=spec.query_block, return_info=True,
    )  # fmt: skip
    if cfg.collect_stats:
        density = info.mask.kept.float().mean()
        if record:
            proc.state.record(proc.index, density)
        else:
            proc.pending.append(density)
    return out


def _layer_selected(index: int, name: str, selectors: Iterable[int | str]) -> bool:
    for sel in selectors:
        if isinstance(sel, int) and sel == index:
            return True
        if isinstance(sel, str) and (name == sel or name.startswith(sel + ".")):
            return True
    return False


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    cls = type(model)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    return sig.bind(model, *args, **kwargs)


def timestep_value(t: Any) -> float | None:
    """One number per forward for step counting: the largest timestep in the batch (Wan 2.2 TI2V
    passes per-token timesteps where the conditioning frame is 0)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().max()) if t.numel() else None
    return float(t)


def _make_pre_hook(state: _ModelState) -> Callable:
    @torch._dynamo.disable
    def pre_hook(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sync_processors(state)
        bound = _bind(model, args, kwargs)
        grid, batch, timestep = state.family.read_inputs(model, bound)
        session = state.session
        session.observe(timestep)
        state.batch = batch
        sparse = session.step >= session.config.dense_steps
        configure_forward(state, grid, sparse, bound.arguments["hidden_states"].device)

    return pre_hook


def configure_forward(state: _ModelState, grid: VideoGrid | None, sparse: bool, device: torch.device) -> None:
    """Set what the processors and tiling hooks read during one forward (no grid: a dense forward)."""
    sparse = sparse and grid is not None
    state.grid = grid
    if state.session.config.collect_stats:
        state.ensure_stats(device)
    # Reassign only on change: torch.compile guards on these bools (one recompile at a switch).
    if state.sparse_now != sparse:
        state.sparse_now = sparse
    tiled = forward_tiling_wanted(state, grid, sparse)
    if tiled:
        state.layout = TokenLayout(grid)
    if state.tiled != tiled:
        state.tiled = tiled


def forward_tiling_wanted(state: _ModelState, grid: VideoGrid | None, sparse: bool) -> bool:
    """Tile once per forward? Only on sparse steps with every layer patched (a dense original
    processor would attend to padding slots), and for "auto" only where no slot is padding."""
    cfg = state.session.config
    if cfg.tiling == "layer" or state.family.install_forward_tiling is None or not sparse or cfg.exclude_layers:
        return False
    assert grid is not None  # a forward without a grid is never sparse
    return cfg.tiling == "forward" or (grid.height % TILE == 0 and grid.width % TILE == 0)


def patch_model(model: torch.nn.Module, family: Family, session: _Session) -> _ModelState:
    if model in _STATES:
        raise RuntimeError(f"NABLA is already applied to this {type(model).__name__}; call remove_nabla first")
    cfg = session.config
    layers = family.attention_layers(model)
    n = len(layers)
    bad = [s for s in cfg.exclude_layers if isinstance(s, int) and s >= n]
    if bad:
        raise ValueError(f"exclude_layers {bad} out of range: {type(model).__name__} has {n} self-attention layers (0..{n - 1})")
    names = [name for name, _ in layers]
    unknown = [s for s in cfg.exclude_layers if isinstance(s, str) and not any(nm == s or nm.startswith(s + ".") for nm in names)]
    if unknown:
        raise ValueError(f"exclude_layers {unknown} match no self-attention layer; names look like {names[0]!r}")
    specs = resolve_layer_specs(cfg.layer_thresholds, names)
    both = [nm for i, nm in enumerate(names) if nm in specs and _layer_selected(i, nm, cfg.exclude_layers)]
    if both:
        raise ValueError(f"layers {both} are both excluded (dense) and given a threshold in layer_thresholds")
    for index, (name, module) in enumerate(layers):
        if _layer_selected(index, name, cfg.exclude_layers):
            continue  # excluded layers keep whatever processor they have
        current = module.processor
        if isinstance(current, NablaProcessorBase):
            raise RuntimeError(f"{name} already has a NABLA processor; call remove_nabla first")
        if type(current).__name__ not in family.original_processor_names:
            wanted = family.original_processor_names[0]
            raise TypeError(
                f"{name} uses attention processor {type(current).__name__}; NABLA replaces only "
                f"{', '.join(family.original_processor_names)}. Put the model's own processor back "
                f"(model.get_submodule({name!r}).set_processor({wanted}())) or leave this layer dense with "
                f"NablaConfig(exclude_layers=[{name!r}])"
            )

    if cfg.tiling == "forward" and family.install_forward_tiling is None:
        raise ValueError(f"tiling='forward' is implemented for WanTransformer3DModel only, not {type(model).__name__}; use 'auto' or 'layer'")
    if cfg.tiling == "forward" and cfg.exclude_layers:
        raise ValueError("tiling='forward' cannot be combined with exclude_layers (a dense layer would see padding slots)")
    state = _ModelState(session=session, family=family, sparse_now=cfg.dense_steps == 0)
    for index, (name, module) in enumerate(layers):
        if _layer_selected(index, name, cfg.exclude_layers):
            continue
        original = module.processor
        wrapper = family.processor_class(original, state, name, len(state.names))
        state.layers[name] = _Layer(module, original, wrapper, len(state.names))
        module.set_processor(wrapper)
        state.names.append(name)
    state.specs = {nm: specs.get(nm, cfg.mask_spec) for nm in state.names}  # one validated spec per layer
    state.handles.append(model.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True))
    if family.install_forward_tiling is not None and cfg.tiling != "layer":
        state.handles.extend(family.install_forward_tiling(model, state))
    _STATES[model] = state
    return state


def unpatch_model(model: torch.nn.Module) -> bool:
    state = _STATES.pop(model, None)
    if state is None:
        return False
    for handle in state.handles:
        handle.remove()
    restore_processors(state)
    return True


def state_of(model: torch.nn.Module) -> _ModelState | None:
    return _STATES.get(model)

