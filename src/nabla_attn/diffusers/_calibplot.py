"""The calibration picture: attention-output error against kept fraction for every layer, with the
chosen point of each layer, and the chosen threshold per layer (matplotlib, imported on use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_calibration(cal: Any, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the calibration plot needs matplotlib: pip install matplotlib") from exc
    err = cal.error.mean(1)  # [L, C], mean over steps
    den = cal.density.mean(1)
    L = len(cal.names)
    choice = cal.choice
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    cmap = plt.get_cmap("viridis")
    ax = axes[0]
    for layer in range(L):
        color = cmap(layer / max(1, L - 1))
        # One line per layer: the threshold grid from sparse (left) to dense (right).
        ax.plot(den[layer] * 100, err[layer], "-", color=color, lw=1, alpha=0.8, label=cal.names[layer] if L <= 12 else None)
        o = choice.options[layer]
        if o >= 0 and cal.head_options is None:  # per-head choices have no single point per layer
            ax.plot(float(den[layer, o]) * 100, float(err[layer, o]), "o", color=color, ms=7, mec="k")
    g = err.mean(0)
    ax.plot(den.mean(0) * 100, g, "k--", lw=2, label="mean over layers (one global threshold)")
    ax.set_xlabel("kept block fraction (%)")
    ax.set_ylabel("attention output relative error vs dense")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    target = ", ".join(f"{k} {v:g}" for k, v in cal.target.items())
    ax.set_title(f"error vs density per layer (dots: chosen); target {target}")
    ax = axes[1]
    xs = list(range(L))
    if cal.head_options is not None:  # per-head thresholds: one bar per head
        H = len(cal.head_options[0])
        width = 0.8 / H
        for h in range(H):
            ax.bar([x - 0.4 + (h + 0.5) * width for x in xs], [cal.candidates[row[h]].threshold for row in cal.head_options],
                   width, color=cmap(h / max(1, H - 1)), label=f"head {h} threshold")
        dens = [float(sum(cal.kept[layer, choice.dense_steps:, o, h].mean() for h, o in enumerate(row)) / H)
                for layer, row in enumerate(cal.head_options)]
    else:
        thr = [1.0 if o < 0 else cal.candidates[o].threshold for o in choice.options]
        ax.bar(xs, thr, color=["#bbbbbb" if o < 0 else "#4c72b0" for o in choice.options], label="threshold (grey: dense layer)")
        dens = [1.0 if o < 0 else float(cal.density[layer, choice.dense_steps:, o].mean()) for layer, o in enumerate(choice.options)]
    ax.plot(xs, dens, "o-", color="#dd8452", label="kept fraction on sparse steps")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    c = cal.chosen
    ax.set_title(f"chosen ({'per head' if cal.head_options is not None else 'per layer'}): {choice.dense_steps} dense steps, "
                 f"kept {c['density']:.1%}, error {c['error']:.3f}")
    fig.suptitle(f"NABLA calibration of {cal.model} ({len(cal.steps)} steps measured)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
