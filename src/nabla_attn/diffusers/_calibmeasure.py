"""Measuring what each candidate mask costs, per layer, head and denoising step (for
:func:`nabla_attn.calibrate`).

While the model runs its calibration inputs with dense attention (so the trajectory is the dense
one), every NABLA processor's ``sparse`` call is replaced by a measuring one (:func:`install`): it
builds each candidate's NABLA table from q, k (the same builder ``nabla_attention`` uses), computes
every candidate's attention output on the same q, k, v in one pass (:func:`candidate_errors`),
accumulates per head the squared error against dense, the squared norm of dense and the kept
fraction, and returns dense attention. Relative error of a layer = sqrt(sum of squared errors / sum of squared norms) over heads,
batch entries and calibration inputs at that step.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import mask_from_means, nabla_attention, tile
from ..constants import BLOCK_TOKENS
from ..grid import TokenLayout
from ..masks import BlockSparseMask, MaskSpec, pool_blocks


class Recorder:
    """Sums per (layer, step): ``err2 [C, H]``, ``ref2 [H]``, ``kept [C, H]`` and the number of calls."""

    def __init__(self, candidates: list[MaskSpec], backend: str, query_stride: int = 1) -> None:
        self.candidates = candidates
        self.backend = backend
        self.query_stride = query_stride
        self.err2: dict[tuple[str, int], torch.Tensor] = {}
        self.ref2: dict[tuple[str, int], torch.Tensor] = {}
        self.kept: dict[tuple[str, int], torch.Tensor] = {}
        self.calls: dict[tuple[str, int], int] = defaultdict(int)

    def add(self, name: str, step: int, q: torch.Tensor, k: torch.Tensor, grid: Any, v: torch.Tensor,
            text_tokens: int, text_position: str, order: str) -> None:
        layout = TokenLayout(grid, text_tokens, text_position)  # type: ignore[arg-type]
        if order == "natural":
            q, k, v = tile(q, layout), tile(k, layout), tile(v, layout)
        # Block means once; each candidate's table from them (what nabla_attention's builder does).
        nv = layout.num_video_blocks
        qa, ka = pool_blocks(q, layout, nv), pool_blocks(k, layout, nv)
        masks = [mask_from_means(qa, ka, layout, spec, backend=self.backend) for spec in self.candidates]  # type: ignore[arg-type]
        err2, ref2 = candidate_errors(q, k, v, layout, masks, "tiled", self.query_stride)
        H = q.shape[1]
        kept = torch.stack([m.kept.float().mean(dim=(0, 2, 3)).double().cpu().expand(H) for m in masks])
        key = (name, step)
        if key in self.err2:
            self.err2[key] += err2
            self.ref2[key] += ref2
            self.kept[key] += kept
        else:
            self.err2[key], self.ref2[key], self.kept[key] = err2, ref2, kept
        self.calls[key] += 1

    def arrays(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """``err2 [L, S, C, H]``, ``ref2 [L, S, H]``, ``kept [L, S, C, H]`` (mean over calls) over the
        steps every layer saw, and those step indices."""
        steps = sorted({s for (_, s) in self.err2})
        missing = [n for n in names if not any((n, s) in self.err2 for s in steps)]
        if not steps or missing:
            raise RuntimeError(
                "the calibration inputs ran no NABLA-patched self-attention"
                + (f" in layers {missing}" if steps else "")
                + ": pass inputs that call the model's forward (pipeline call kwargs, forward kwargs or a callable)"
            )
        steps = [s for s in steps if all((n, s) in self.err2 for n in names)]
        heads = {self.ref2[(n, steps[0])].shape[0] for n in names}
        if len(heads) != 1:
            raise ValueError(f"layers have different head counts {sorted(heads)}; calibration needs one")
        err2 = torch.stack([torch.stack([self.err2[(n, s)] for s in steps]) for n in names])
        ref2 = torch.stack([torch.stack([self.ref2[(n, s)] for s in steps]) for n in names])
        calls = torch.tensor([[self.calls[(n, s)] for s in steps] for n in names], dtype=torch.float64)
        kept = torch.stack([torch.stack([self.kept[(n, s)] for s in steps]) for n in names]) / calls[:, :, None, None]
        return err2, ref2, kept, steps


def candidate_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                     masks: list[BlockSparseMask], order: str, query_stride: int = 1,
                     chunk_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per candidate mask and head, the squared error of its attention output against dense, summed
    over batch and real query tokens (``[C, H]`` float64), and dense's squared norm (``[H]``).

    Why not run ``nabla_attention`` per candidate: one dense pass gives them all. Per query token and
    key block we keep the block's partial softmax sums (max ``m``, ``Z = sum exp(s - m)``,
    ``N = sum exp(s - m) v``); a mask's output is then the rescaled sum of its kept blocks' partials,
    ``O = sum_b w_b N_b / sum_b w_b Z_b`` with ``w_b = exp(m_b - max_b m)``: exactly NABLA's attention
    (softmax over the kept blocks' real tokens) at ``tokens x blocks x head_dim`` work per candidate
    instead of an attention pass. Rows whose kept blocks all underflow that weight are recomputed with
    the kept maximum. ``query_stride=n`` measures every n-th query token only (an unbiased estimate
    of both sums, n times cheaper). Queries run in chunks of about ``chunk_bytes``.
    """
    B, H, _, D = q.shape
    nb = layout.num_blocks
    if order == "natural":
        q, k, v = tile(q, layout), tile(k, layout), tile(v, layout)
    valid = layout.valid_tokens(q.device).view(nb, BLOCK_TOKENS)
    scale = 1.0 / math.sqrt(D)
    err2 = torch.zeros(len(masks), H, dtype=torch.float64)
    ref2 = torch.zeros(H, dtype=torch.float64)
    # Query rows (tiled positions) measured, in chunks: N is [rows, nb, Dv] float32.
    rows_all = torch.arange(0, nb * BLOCK_TOKENS, query_stride, device=q.device)
    rows_all = rows_all[valid.view(-1)[rows_all]]
    chunk = max(1, chunk_bytes // (nb * (v.shape[-1] + BLOCK_TOKENS + 3) * 4))
    for b in range(B):
        for h in range(H):
            kb = k[b, h].float().view(nb, BLOCK_TOKENS, D)
            vb = v[b, h].float().view(nb, BLOCK_TOKENS, -1)
            for c0 in range(0, len(rows_all), chunk):
                rows = rows_all[c0 : c0 + chunk]
                s = (q[b, h, rows].float() @ kb.reshape(-1, D).T).view(len(rows), nb, BLOCK_TOKENS) * scale
                if layout.padded:
                    s.masked_fill_(~valid, -math.inf)  # padding keys are not attended
                m = s.amax(-1)  # [R, nb]
                e = torch.exp(s.sub_(m[..., None]))
                n = torch.bmm(e.transpose(0, 1), vb).transpose(0, 1)  # [R, nb, Dv]
                z = e.sum(-1)
                del s, e
                ew = torch.exp(m - m.amax(-1, keepdim=True))

                def combine(keep: torch.Tensor) -> torch.Tensor:
                    w = ew * keep
                    den = (w * z).sum(-1, keepdim=True)
                    low = (den <= 1e-30).squeeze(-1)
                    if bool(low.any()):  # every kept block far below the row's best: rescale those rows
                        mm = m[low].masked_fill(~keep[low], -math.inf)
                        w[low] = torch.exp(mm - mm.amax(-1, keepdim=True))
                        den = (w * z).sum(-1, keepdim=True)
                    return torch.bmm(w[:, None, :], n).squeeze(1) / den

                ref = combine(torch.ones_like(m, dtype=torch.bool))
                ref2[h] += float(ref.double().square().sum())
                blocks = rows // BLOCK_TOKENS
                for c, mask in enumerate(masks):
                    kept = mask.kept[min(b, mask.kept.shape[0] - 1), min(h, mask.kept.shape[1] - 1)]
                    out = combine(kept[blocks // (mask.query_block // BLOCK_TOKENS)])
                    err2[c, h] += float((out - ref).double().square().sum())
    return err2, ref2


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Any, text_tokens: int, text_position: str,
           order: str, backend: str) -> torch.Tensor:
    if order == "natural":
        return F.scaled_dot_product_attention(q, k, v)  # every token sees every token: exactly dense
    # Tiled order has padding slots, which the sparse op masks: threshold 1 keeps every block.
    return nabla_attention(q, k, v, grid, 1.0, None, text_tokens, text_position, backend=backend,  # type: ignore[arg-type]
                           token_order="tiled")


def install(processor: Any, recorder: Recorder) -> None:
    """Make ``processor`` (a NablaProcessorBase) measure instead of running NABLA: an instance
    attribute shadows the class's ``sparse``, the one call every family's processor makes."""

    def sparse(self: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_tokens: int, text_position: str,
               record: bool = True, tiled: bool | None = None) -> torch.Tensor:
        state = self.state
        if state.grid is None:
            raise RuntimeError(f"{self.name}: the grid is unknown; calibrate through the transformer's forward")
        order = "tiled" if (state.tiled if tiled is None else tiled) else "natural"
        with torch.no_grad():
            recorder.add(self.name, state.session.step, q, k, state.grid, v, text_tokens, text_position, order)
        return _dense(q, k, v, state.grid, text_tokens, text_position, order, recorder.backend)

    processor.sparse = types.MethodType(sparse, processor)
