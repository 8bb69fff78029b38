"""The bundled video DiT: a tiny diffusers ``WanTransformer3DModel`` in pixel space, class-conditioned.

The network sees RGB video in ``[-1, 1]`` shaped ``[B, 3, T, H, W]``; patch ``(1, 2, 2)`` makes a
``T x H/2 x W/2`` token grid. It is trained with rectified flow (``x_t = (1 - t) x0 + t eps``, the
network predicts ``eps - x0``) on three real clips; the condition is the clip id, fed through Wan's
text path as a few learned embedding tokens (so cross-attention sees them as "text").

By default self-attention runs diffusers' own ``WanAttnProcessor`` (what
:func:`nabla_attn.diffusers.apply_nabla` patches; the demo uses that path). For studies,
:meth:`TinyVideoDiT.set_attention` installs :class:`SelfAttentionProcessor`, which computes q, k, v
exactly like ``WanAttnProcessor`` and runs block-sparse attention with a mask policy (NABLA, STA,
both, random, or any table), recording per-layer kept density, the masks and, on request, the
relative error of the sparse output against dense attention on the same q, k, v. Cross-attention
always keeps diffusers' processor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..attention import nabla_attention, tile, untile
from ..grid import TokenLayout, VideoGrid
from ..masks import BlockSparseMask, sta_mask
from .tables import nabla_table, token_mask

CLASS_NAMES = ("bigbuckbunny", "bikes", "carphone")
WEIGHTS_FILE = "tiny_wan_video.safetensors"
CONFIG_FILE = "tiny_wan_video.json"


@dataclass(frozen=True)
class TinyWanConfig:
    """Architecture of the bundled model (stored next to the weights as JSON)."""

    num_layers: int = 5
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    ffn_dim: int = 768
    text_dim: int = 64
    freq_dim: int = 128
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 3
    num_classes: int = len(CLASS_NAMES)
    class_tokens: int = 4
    rope_max_seq_len: int = 256
    class_names: tuple[str, ...] = CLASS_NAMES
    # Filled in by training, informational only.
    trained: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TinyWanConfig":
        d = dict(d)
        d["patch_size"] = tuple(d["patch_size"])
        d["class_names"] = tuple(d["class_names"])
        return TinyWanConfig(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class TinyVideoDiT(torch.nn.Module):
    """``WanTransformer3DModel`` plus a learned embedding per clip id used as its text tokens."""

    def __init__(self, config: TinyWanConfig) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.config = config
        self.transformer = WanTransformer3DModel(
            patch_size=config.patch_size,
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            rope_max_seq_len=config.rope_max_seq_len,
        )
        self.class_embedding = torch.nn.Embedding(config.num_classes, config.class_tokens * config.text_dim)
        torch.nn.init.normal_(self.class_embedding.weight, std=1.0)
        # Our processors are installed only while a sparse policy is set; otherwise self-attention
        # runs diffusers' own WanAttnProcessor, which is what nabla_attn.diffusers.apply_nabla patches.
        self.processors: list[SelfAttentionProcessor] = [
            SelfAttentionProcessor(layer=i) for i in range(len(self.transformer.blocks))
        ]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity ``eps - x0`` for noisy video ``x`` [B, 3, T, H, W] at times ``t`` [B] in [0, 1]."""
        cfg = self.config
        _, _, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        grid = VideoGrid(T // pt, H // ph, W // pw)
        for proc in self.processors:
            proc.grid = grid
        context = self.class_embedding(labels).view(labels.shape[0], cfg.class_tokens, cfg.text_dim)
        # Wan's timestep embedding expects the 0..1000 scale of its schedulers.
        out = self.transformer(x, t * 1000.0, context.to(x.dtype), return_dict=False)[0]
        return out

    def set_attention(self, policy: "MaskPolicy | None") -> None:
        """Diffusers' dense processor everywhere (``None``) or sparse self-attention with ``policy``
        in every layer (through :class:`SelfAttentionProcessor`)."""
        try:
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor
        except ImportError:  # diffusers < 0.35 named it WanAttnProcessor2_0
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor2_0 as WanAttnProcessor

        for block, proc in zip(self.transformer.blocks, self.processors):
            proc.policy = policy
            if policy is None:
                if isinstance(block.attn1.processor, SelfAttentionProcessor):
                    block.attn1.set_processor(WanAttnProcessor())
            elif block.attn1.processor is not proc:
                block.attn1.set_processor(proc)

    def reset_stats(self, record_error: bool = False, keep_masks: bool = False) -> None:
        for proc in self.processors:
            proc.stats = []
            proc.record_error = record_error
            proc.keep_masks = keep_masks
            proc.masks = []


# A mask policy turns (q, k in tiled layout, layout, layer index) into a block table.
MaskFn = Callable[[torch.Tensor, torch.Tensor, TokenLayout, int], BlockSparseMask]


@dataclass
class MaskPolicy:
    """How sparse self-attention picks its blocks.

    ``kind``: "nabla" (CDF threshold), "sta" (window), "nabla+sta" (union), "random" (each block pair
    kept with probability ``density``, diagonal always kept, fixed seed per layer), or "custom"
    (``mask_fn``). ``query_block`` 64 or 128. ``layer_thresholds`` (nabla kinds): one threshold per
    layer replacing ``threshold``, None for a dense layer (recorded with density 1 and error 0);
    :meth:`from_calibration` reads them from a ``nabla calibrate`` file.
    """

    kind: str = "nabla"
    threshold: float | None = 0.9
    sta_window: tuple[int, int, int] | None = None
    density: float | None = None
    query_block: int = 64
    seed: int = 0
    # "auto": nabla_attention's choice (Triton on CUDA, the gathering reference on CPU), or any
    # nabla_attention backend name.
    backend: str = "auto"
    # "masked-sdpa": the same attention as PyTorch SDPA with the block table expanded to a token
    # mask. No sparsity saving, but SDPA's fused CPU backward is far faster than the reference
    # backend's gathers: training/finetune.py uses it on CPU.
    attention: str = "nabla"
    mask_fn: MaskFn | None = None
    layer_thresholds: tuple[float | tuple[float, ...] | None, ...] | None = None

    def __post_init__(self) -> None:
        kinds = ("nabla", "sta", "nabla+sta", "random", "custom")
        if self.kind not in kinds:
            raise ValueError(f"MaskPolicy.kind must be one of {kinds}, got {self.kind!r}")
        if self.kind in ("nabla", "nabla+sta") and self.threshold is None:
            raise ValueError(f"MaskPolicy kind {self.kind!r} needs a threshold")
        if self.kind in ("sta", "nabla+sta") and self.sta_window is None:
            raise ValueError(f"MaskPolicy kind {self.kind!r} needs sta_window")
        if self.kind == "random" and not (self.density is not None and 0.0 < self.density <= 1.0):
            raise ValueError(f"MaskPolicy kind 'random' needs density in (0, 1], got {self.density!r}")
        if self.kind == "custom" and self.mask_fn is None:
            raise ValueError("MaskPolicy kind 'custom' needs mask_fn")
        if self.attention not in ("nabla", "masked-sdpa"):
            raise ValueError(f"MaskPolicy.attention must be 'nabla' or 'masked-sdpa', got {self.attention!r}")
        if self.layer_thresholds is not None:
            if self.kind not in ("nabla", "nabla+sta"):
                raise ValueError(f"MaskPolicy layer_thresholds need kind 'nabla' or 'nabla+sta', got {self.kind!r}")
            self.layer_thresholds = tuple(tuple(t) if isinstance(t, (list, tuple)) else t for t in self.layer_thresholds)
            flat = [x for t in self.layer_thresholds for x in (t if isinstance(t, tuple) else (t,))]
            bad = [t for t in flat if t is not None and not (0.0 < t <= 1.0)]
            if bad:
                raise ValueError(f"MaskPolicy layer_thresholds must be in (0, 1] or None, got {bad}")

    @staticmethod
    def from_calibration(source: str | Path | dict[str, Any], num_layers: int) -> tuple["MaskPolicy", int]:
        """The policy and dense-step count of a calibration file for the bundled model (layers
        ``blocks.<i>.attn1``). Returns ``(policy, dense_steps)``."""
        from ..diffusers._perlayer import calibration_fields

        fields = calibration_fields(source)
        by_index: dict[int, float | None] = {}
        for name, value in fields["layer_thresholds"].items():
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
                raise ValueError(f"calibration layer {name!r} is not a bundled-model layer (blocks.<i>.attn1)")
            if isinstance(value, dict):
                raise ValueError(f"calibration layer {name!r} has its own STA window; MaskPolicy takes thresholds only")
            by_index[int(parts[1])] = value
        if sorted(by_index) != list(range(num_layers)):
            raise ValueError(f"calibration names layers {sorted(by_index)}, the model has {num_layers}")
        window = fields["sta_window"]
        policy = MaskPolicy("nabla+sta" if window else "nabla", threshold=fields["threshold"], sta_window=window,
                            query_block=fields["query_block"],
                            layer_thresholds=tuple(by_index[i] for i in range(num_layers)))
        return policy, fields["dense_steps"]

    def label(self) -> str:
        if self.layer_thresholds is not None:
            per = "/".join("dense" if t is None else f"{t:g}" if not isinstance(t, tuple)
                           else "h(" + ",".join(f"{x:g}" for x in t) + ")" for t in self.layer_thresholds)
            return f"{self.kind}(layers={per}{'' if self.kind == 'nabla' else f',win={self.sta_window}'})"
        if self.kind == "nabla":
            return f"nabla(thr={self.threshold})"
        if self.kind == "sta":
            return f"sta(win={self.sta_window})"
        if self.kind == "nabla+sta":
            return f"nabla+sta(thr={self.threshold},win={self.sta_window})"
        if self.kind == "random":
            return f"random(p={self.density})"
        return "custom"

    def threshold_for(self, layer: int) -> float | tuple[float, ...] | None:
        """This layer's threshold (a tuple: one per head; None: a dense layer under ``layer_thresholds``)."""
        return self.threshold if self.layer_thresholds is None else self.layer_thresholds[layer]


def random_block_mask(layout: TokenLayout, heads: int, density: float, seed: int, query_block: int = 64,
                      device: torch.device | str | None = None) -> BlockSparseMask:
    """Each (query block, key block) pair kept with probability ``density``; the diagonal always
    (so no row is empty). Text blocks, if any, are all kept. Deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    nb = layout.num_blocks
    kept = torch.rand(1, heads, nb, nb, generator=gen) < density
    kept |= torch.eye(nb, dtype=torch.bool)
    nv = layout.num_video_blocks
    kept[..., nv:, :] = True
    kept[..., :, nv:] = True
    if query_block == 128:
        pad = nb % 2
        if pad:
            kept = torch.cat([kept, kept.new_zeros(1, heads, 1, nb)], dim=2)
        kept = kept.view(1, heads, -1, 2, nb).any(3)
    return BlockSparseMask(kept.to(device), layout, query_block)


@dataclass
class LayerStat:
    layer: int
    density: float
    head_density: list[float]
    rel_error: float | None = None


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same rotation as diffusers' WanAttnProcessor (interleaved pairs), x: [B, S, H, D].
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SelfAttentionProcessor:
    """Wan self-attention (``attn1``) with a switch between dense SDPA and block-sparse attention."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.grid: VideoGrid | None = None
        self.policy: MaskPolicy | None = None
        self.record_error = False
        self.keep_masks = False
        self.stats: list[LayerStat] = []
        self.masks: list[torch.Tensor] = []

    def _mask(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> BlockSparseMask | None:
        p = self.policy
        assert p is not None
        if p.kind in ("nabla", "nabla+sta"):
            return None  # built from q and k by nabla_mask_tiled
        if p.kind == "sta":
            return sta_mask(layout.grid, p.sta_window, query_block=p.query_block, device=q.device)  # type: ignore[arg-type]
        if p.kind == "random":
            return random_block_mask(layout, q.shape[1], p.density, p.seed * 1000 + self.layer,  # type: ignore[arg-type]
                                     p.query_block, q.device)
        assert p.mask_fn is not None
        return p.mask_fn(q, k, layout, self.layer)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SelfAttentionProcessor serves self-attention only (attn1)")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q = _apply_rotary(q, *rotary_emb)
            k = _apply_rotary(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]

        if self.policy is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if self.grid is None:
                raise RuntimeError("SelfAttentionProcessor.grid is unset; call the model through TinyVideoDiT")
            p = self.policy
            if p.layer_thresholds is not None and p.threshold_for(self.layer) is None:
                return self._dense_layer(attn, q, k, v, hidden_states)
            layout = TokenLayout(self.grid)
            qt, kt, vt = tile(q, layout), tile(k, layout), tile(v, layout)
            used = self._mask(qt, kt, layout)
            if used is None:
                used = nabla_table(qt, kt, layout, p.threshold_for(self.layer),  # type: ignore[arg-type]
                                    p.sta_window if p.kind == "nabla+sta" else None, p.query_block, p.backend)
            if p.attention == "masked-sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(used, q.shape[0], q.shape[1]))
            else:
                out_t = nabla_attention(qt, kt, vt, self.grid, mask=used, backend=p.backend,  # type: ignore[arg-type]
                                        token_order="tiled")
                out = untile(out_t, layout)  # type: ignore[arg-type]
            rel = None
            if self.record_error:
                ref = F.scaled_dot_product_attention(q, k, v)
                rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
            hd = used.kept.float().mean(dim=(-2, -1)).mean(0)  # per head, averaged over batch
            self.stats.append(LayerStat(self.layer, float(used.kept.float().mean()), hd.tolist(), rel))
            if self.keep_masks:
                self.masks.append(used.kept[0].cpu())
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _dense_layer(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     hidden_states: torch.Tensor) -> torch.Tensor:
        """A layer a calibration left dense: SDPA, recorded as density 1 and error 0 (so means over
        layers count it as full work)."""
        out = F.scaled_dot_product_attention(q, k, v)
        heads = q.shape[1]
        self.stats.append(LayerStat(self.layer, 1.0, [1.0] * heads, 0.0 if self.record_error else None))
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def assets_dir() -> Path:
    return Path(str(resources.files("nabla_attn") / "assets"))


def load_bundled(path: str | Path | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> TinyVideoDiT:
    """The trained model shipped in ``nabla_attn/assets`` (or a safetensors file + its .json beside it)."""
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else assets_dir() / WEIGHTS_FILE
    config_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise FileNotFoundError(f"model weights not found: {weights}")
    if not config_path.is_file():
        raise FileNotFoundError(f"model config not found next to the weights: {config_path}")
    config = TinyWanConfig.from_dict(json.loads(config_path.read_text()))
    model = TinyVideoDiT(config)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # The RoPE tables are non-persistent buffers, rebuilt from the config; nothing else may be missing.
    if missing or unexpected:
        raise RuntimeError(f"weights {weights} do not match the config: missing {missing}, unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


def flow_timesteps(steps: int, shift: float = 2.0) -> list[float]:
    """Sampling times from 1 (noise) to 0 (data), shifted toward high noise like SD3/Wan schedules."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = []
    for i in range(steps + 1):
        s = 1.0 - i / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out


@torch.no_grad()
def sample(
    model: TinyVideoDiT,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    *,
    shift: float = 2.0,
    progress: Any = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler integration of the learned flow from ``noise`` (t=1) to a video (t=0), values in [-1, 1]."""
    x = noise.clone()
    times = flow_timesteps(steps, shift)
    # On CUDA the network runs under bf16 autocast (as in training); the Euler update stays float32.
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    for i in range(steps):
        if on_step is not None:
            on_step(i, x)
        t0, t1 = times[i], times[i + 1]
        t = torch.full((x.shape[0],), t0, device=x.device, dtype=x.dtype)
        with amp:
            v = model(x, t, labels)
        x = x + (t1 - t0) * v.float()
        if progress is not None:
            progress.update(1)
    return x.clamp(-1.0, 1.0)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CLASS_NAMES",
    "MaskPolicy",
    "SelfAttentionProcessor",
    "TinyVideoDiT",
    "TinyWanConfig",
    "flow_timesteps",
    "load_bundled",
    "random_block_mask",
    "sample",
]
