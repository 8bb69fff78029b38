"""Choosing per-layer masks and dense steps from measured error/density curves (for
:func:`nabla_attn.calibrate`).

The problem is a multiple-choice knapsack: every layer takes one option (a candidate mask or dense),
the first ``dense_steps`` steps are dense everywhere, and the sum of densities over (layer, step) is
bounded. It is solved exactly up to a density grid by dynamic programming over layers (a vector of
the best error per density bin), for every dense-step count, in a few milliseconds for 60 layers.
Why not a Lagrangian: it only reaches points on the convex hull, and with 5-40 layers the gaps
between hull points are several density points wide.

Conventions: ``err[l][s][c]`` is the relative L2 error of layer ``l``'s attention output at step
``s`` with candidate ``c`` (dense: 0) and ``den[l][s][c]`` its kept fraction (dense: 1). The
objective is the mean error over all (layer, step) pairs, and the budget the mean kept fraction
over all of them, dense layers and steps counted as 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BINS = 20000  # density resolution of the DP: 1/20000 of the whole budget


@dataclass(frozen=True)
class Choice:
    options: tuple[int, ...]  # per layer: candidate index, or -1 for a dense layer
    dense_steps: int
    density: float  # mean kept fraction over (layer, step), exact (not binned)
    error: float  # mean relative error over (layer, step)


def _layer_options(err: torch.Tensor, den: torch.Tensor, dense_steps: int, allow_dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and option, the summed error and density over the sparse steps: ``[L, C(+1)]``."""
    L, S, _ = err.shape
    e = err[:, dense_steps:].sum(1)
    d = den[:, dense_steps:].sum(1)
    if allow_dense:
        e = torch.cat([e, e.new_zeros(L, 1)], 1)
        d = torch.cat([d, d.new_full((L, 1), float(S - dense_steps))], 1)
    return e, d


def _dp(e: torch.Tensor, units: torch.Tensor, base: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Best summed error per density bin after all layers, and per layer the option taken per bin."""
    best = torch.full((BINS + 1,), math.inf, dtype=torch.float64)
    best[base] = 0.0
    picks: list[torch.Tensor] = []
    for layer in range(e.shape[0]):
        new = torch.full_like(best, math.inf)
        pick = torch.full((BINS + 1,), -1, dtype=torch.long)
        for o in range(e.shape[1]):
            u = int(units[layer, o])
            if u > BINS:
                continue
            cand = torch.full_like(best, math.inf)
            cand[u:] = best[: BINS + 1 - u] + float(e[layer, o])
            better = cand < new
            new[better] = cand[better]
            pick[better] = o
        best = new
        picks.append(pick)
    return best, picks


def _backtrack(picks: list[torch.Tensor], units: torch.Tensor, b: int) -> list[int]:
    out = []
    for layer in range(len(picks) - 1, -1, -1):
        o = int(picks[layer][b])
        out.append(o)
        b -= int(units[layer, o])
    return out[::-1]


def solve(
    err: torch.Tensor, den: torch.Tensor, *, density: float | None = None, error: float | None = None,
    max_dense_steps: int = 0, allow_dense_layers: bool = True, dense_steps: int | None = None,
) -> Choice:  # fmt: skip
    """The options and dense-step count with the least mean error at mean density <= ``density``,
    or the least mean density at mean error <= ``error``; ``dense_steps`` fixes the dense-step count
    instead of trying 0..``max_dense_steps``. Raises ValueError when no choice meets the target (the
    message gives the closest one)."""
    if (density is None) == (error is None):
        raise ValueError("give exactly one target: density or error")
    err = err.double()
    den = den.double()
    L, S, C = err.shape
    total = float(L * S)
    counts = [dense_steps] if dense_steps is not None else range(0, min(max_dense_steps, S - 1) + 1)
    best: Choice | None = None
    for ds in counts:
        e, d = _layer_options(err, den, ds, allow_dense_layers)
        units = torch.round(d / total * BINS).long()
        table, picks = _dp(e, units, round(L * ds / total * BINS))
        c: Choice | None = None
        if density is not None:
            cap = min(BINS, int(math.floor(density * BINS + 1e-9)))
            table = table[: cap + 1].clone()
            # Bins are rounded: check the exact density, and drop a bin that is really over budget.
            for _ in range(64):
                b = int(torch.argmin(table))
                if not math.isfinite(float(table[b])):
                    break
                c = _evaluate(err, den, _backtrack(picks, units, b), ds, allow_dense_layers)
                if c.density <= density + 1e-9:
                    break
                table[b], c = math.inf, None
        else:
            ok = (table / total <= error + 1e-12).nonzero()
            if len(ok):
                c = _evaluate(err, den, _backtrack(picks, units, int(ok[0])), ds, allow_dense_layers)
        if c is None:
            continue
        key = (c.error, c.density) if density is not None else (c.density, c.error)
        if best is None or key < ((best.error, best.density) if density is not None else (best.density, best.error)):
            best = c
    if best is None:
        floor = _evaluate(err, den, [int(torch.argmin(den[l].sum(0))) for l in range(L)], 0, allow_dense_layers)
        ceil = _evaluate(err, den, [int(torch.argmin(err[l].sum(0))) for l in range(L)], 0, allow_dense_layers)
        if density is not None:
            raise ValueError(f"no candidate reaches mean density <= {density:.3f}: the sparsest candidates keep "
                             f"{floor.density:.3f}; add lower thresholds")
        raise ValueError(f"no candidate reaches mean error <= {error:.4f}: the densest sparse candidates give "
                         f"{ceil.error:.4f}; allow dense layers or steps, or add higher thresholds")
    return best


def _evaluate(err: torch.Tensor, den: torch.Tensor, options: list[int], dense_steps: int, allow_dense: bool) -> Choice:
    L, S, C = err.shape
    e_sum, d_sum = 0.0, float(L * dense_steps)
    opts = []
    for layer, o in enumerate(options):
        if allow_dense and o == C:  # the dense option
            d_sum += S - dense_steps
            opts.append(-1)
        else:
            e_sum += float(err[layer, dense_steps:, o].sum())
            d_sum += float(den[layer, dense_steps:, o].sum())
            opts.append(o)
    return Choice(tuple(opts), dense_steps, d_sum / (L * S), e_sum / (L * S))


def evaluate(err: torch.Tensor, den: torch.Tensor, options: list[int], dense_steps: int) -> Choice:
    """Mean error and density of given options (-1: dense layer) with ``dense_steps`` dense steps."""
    C = err.shape[2]
    return _evaluate(err.double(), den.double(), [C if o < 0 else o for o in options], dense_steps, True)


def per_head_choice(err2: torch.Tensor, ref2: torch.Tensor, den_h: torch.Tensor, density: float,
                    dense_steps: int) -> tuple[list[list[int]], float, float]:
    """Every *head* picks its own candidate, at mean density <= ``density`` with ``dense_steps`` dense
    steps: ``(options [L][H], mean layer error, mean density)``; to judge whether per-head thresholds
    pay against the per-layer choice.

    ``err2``/``den_h``: ``[L, S, C, H]`` squared error sums and kept fractions per head; ``ref2``:
    ``[L, S, H]``. Heads are allocated on their share of their layer's squared relative error
    (separable over heads); the returned error is the true mean over (layer, step) of the layers'
    relative errors.
    """
    L, S, C, H = err2.shape
    share = err2 / ref2.sum(-1).clamp_min(1e-30)[:, :, None, None]  # each head's part of the squared error
    items_e = share.permute(0, 3, 1, 2).reshape(L * H, S, C)  # item = (layer, head)
    items_d = den_h.permute(0, 3, 1, 2).reshape(L * H, S, C)  # mean over items = mean over layers
    choice = solve(items_e, items_d, density=density, dense_steps=dense_steps, allow_dense_layers=False)
    opts = [list(choice.options[layer * H : (layer + 1) * H]) for layer in range(L)]
    chosen_err2 = torch.zeros(L, S, dtype=torch.float64)
    chosen_den = torch.zeros(L, S, dtype=torch.float64)
    for layer in range(L):
        for h in range(H):
            o = opts[layer][h]
            chosen_err2[layer] += err2[layer, :, o, h].double()
            chosen_den[layer] += den_h[layer, :, o, h].double() / H
    rel = (chosen_err2 / ref2.sum(-1).double().clamp_min(1e-30)).sqrt()
    rel[:, :dense_steps] = 0.0
    chosen_den[:, :dense_steps] = 1.0
    return opts, float(rel.mean()), float(chosen_den.mean())
