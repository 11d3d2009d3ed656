"""PNG plots for the diagnostics (matplotlib, Agg backend): probe loss curves and the drift heatmap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from anima_ft.model.groups import group_sort_key  # noqa: E402


def probe_plot(
    x_labels: Sequence[str],
    losses: dict[str, list[list[float]]],
    sigmas: Sequence[float],
    path: str | Path,
    x_title: str = "checkpoint",
    relative: bool = False,
) -> Path:
    """One panel per eval set: loss (or loss / first point) against checkpoint/step, one line per sigma.

    ``losses[set][x][j]`` is the loss of point ``x`` at ``sigmas[j]``.
    """
    names = list(losses)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    xs = list(range(len(x_labels)))
    numeric = all(_is_number(s) for s in x_labels)
    for ax, name in zip(axes[0], names):
        table = losses[name]
        for j, sigma in enumerate(sigmas):
            ys = [row[j] for row in table]
            if relative:
                ys = [y / ys[0] for y in ys]
            ax.plot([float(s) for s in x_labels] if numeric else xs, ys, marker="o", label=f"sigma = {sigma:g}")
        if not numeric:
            ax.set_xticks(xs, x_labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"eval set: {name}")
        ax.set_xlabel(x_title)
        ax.set_ylabel("loss / first point" if relative else "denoising loss (MSE of velocity)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def drift_heatmap(comparisons, path: str | Path) -> Path:
    """Heatmap of relative change per group (rows) and comparison (columns), log colour scale, values printed."""
    groups = sorted({g for c in comparisons for g in c.groups}, key=group_sort_key)
    values = [[c.groups[g].rel if g in c.groups else math.nan for c in comparisons] for g in groups]
    finite = [v for row in values for v in row if v > 0 and math.isfinite(v)]
    vmin, vmax = (min(finite), max(finite)) if finite else (1e-6, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin / 2, vmax * 2
    height = max(3.0, 0.22 * len(groups) + 1.5)
    fig, ax = plt.subplots(figsize=(2.2 * len(comparisons) + 3.5, height))
    masked = [[v if v > 0 and math.isfinite(v) else math.nan for v in row] for row in values]
    im = ax.imshow(masked, aspect="auto", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax))
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xticks(range(len(comparisons)), [c.label for c in comparisons], rotation=20, ha="right", fontsize=8)
    if len(groups) * len(comparisons) <= 400:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, label="relative change ||B-A|| / ||A||")
    ax.set_title("weight drift by module group")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
