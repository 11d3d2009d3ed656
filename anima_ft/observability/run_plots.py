"""``anima-ft plot RUN [RUN ...]``: PNG curves of one or more training runs from their ``metrics.jsonl``, no wandb.

Clusters without internet run wandb offline or not at all; this turns the run directories into pictures that compare
runs at a glance (e.g. a replay run against a no-replay run):

* ``loss.png``: the training loss per run, raw (faint) and smoothed, plus one panel per data source
  (``loss/<source>``) when there are several; dashed lines mark stage transitions.
* ``probe.png``: the forgetting probe's mean loss relative to step 0 (``probe/<set>/mean_rel``), one panel per eval
  set; written only when a run has probe metrics.
* ``train_stats.png``: learning rate per group, gradient norm, samples/s and peak memory.

Smoothing is the bias-corrected exponential moving average ``m_t = a m_(t-1) + (1 - a) x_t``,
``s_t = m_t / (1 - a^t)`` over the logged rows (``--smooth a``; 0 = off).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anima_ft.observability.metrics import read_metrics  # noqa: E402

logger = logging.getLogger(__name__)


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Bias-corrected exponential moving average (module docstring); NaN/inf inputs are skipped, not averaged."""
    if alpha <= 0:
        return list(values)
    out, m, n = [], 0.0, 0
    for x in values:
        if math.isfinite(x):
            n += 1
            m = alpha * m + (1 - alpha) * x
        out.append(m / (1 - alpha**n) if n else float("nan"))
    return out


def series(rows: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the rows that have it (numbers only), in step order."""
    steps, values = [], []
    for step in sorted(rows):
        v = rows[step].get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(step)
            values.append(float(v))
    return steps, values


def stage_starts(rows: dict[int, dict]) -> list[int]:
    """Steps whose row's ``stage`` differs from the previous logged row's (the first step of each later stage)."""
    out, last = [], None
    for step in sorted(rows):
        stage = rows[step].get("stage")
        if stage is None:
            continue
        if last is not None and stage != last:
            out.append(step)
        last = stage
    return out


def _keys(runs: dict[str, dict[int, dict]], prefix: str, suffix: str = "") -> list[str]:
    found = {k for rows in runs.values() for row in rows.values() for k in row
             if k.startswith(prefix) and k.endswith(suffix)}
    return sorted(found)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_plot(runs: dict[str, dict[int, dict]], path: Path, alpha: float) -> Path:
    """Total loss and each ``loss/<source>``: one panel each, one colour per run."""
    sources = _keys(runs, "loss/")
    keys = ["loss", *(sources if len(sources) > 1 else [])]  # one source: its curve is the total
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, rows) in enumerate(runs.items()):
            steps, values = series(rows, key)
            if not steps:
                continue
            colour = f"C{i}"
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(values, alpha), color=colour, label=label)
            for s in stage_starts(rows):
                ax.axvline(s, color=colour, linestyle="--", alpha=0.5, linewidth=0.8)
        ax.set_title(key if key == "loss" else f"loss on {key.split('/', 1)[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def probe_plot(runs: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """``probe/<set>/mean_rel`` against step, one panel per eval set; None when no run has probe metrics."""
    keys = _keys(runs, "probe/", "/mean_rel")
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, rows) in enumerate(runs.items()):
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, color=f"C{i}", label=label)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_title(f"forgetting probe: {key.split('/')[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("probe loss / step-0 loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def stats_plot(runs: dict[str, dict[int, dict]], path: Path) -> Path:
    """Learning rate per group, gradient norm, samples/s and peak memory."""
    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5))
    axes = grid.ravel()
    lr_keys = _keys(runs, "lr/")
    for i, (label, rows) in enumerate(runs.items()):
        for j, key in enumerate(lr_keys):
            steps, values = series(rows, key)
            if steps:
                axes[0].plot(steps, values, color=f"C{i}", linestyle=["-", "--", ":", "-."][j % 4],
                             label=f"{label} {key[3:]}" if len(runs) > 1 else key[3:])
        for ax, key in zip(axes[1:], ("grad_norm", "samples_per_s", "peak_mem_gb")):
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, color=f"C{i}", label=label)
    titles = ("learning rate", "gradient norm", "samples / s", "peak memory (GiB)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None,
              alpha: float = 0.9) -> list[Path]:
    """Write the module's PNGs for ``run_dirs`` (each holding a ``metrics.jsonl``) into ``out_dir``."""
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs: dict[str, dict[int, dict]] = {}
    for label, run in zip(labels, run_dirs):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"{run} has no metrics.jsonl: give training run directories (run.dir)")
        runs[label] = read_metrics(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [loss_plot(runs, out / "loss.png", alpha), stats_plot(runs, out / "train_stats.png")]
    probe = probe_plot(runs, out / "probe.png")
    return written + ([probe] if probe else [])


def main(argv: list[str] | None = None) -> int:
    """``anima-ft plot RUN [RUN ...] [--labels a,b] [--out-dir DIR] [--smooth 0.9]``."""
    ap = argparse.ArgumentParser(prog="anima-ft plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="training run directories (each with a metrics.jsonl)")
    ap.add_argument("--labels", default=None, help="comma-separated legend names (default: the directory names)")
    ap.add_argument("--out-dir", default=None, help="where to write the PNGs (default: the first run's plots/)")
    ap.add_argument("--smooth", type=float, default=0.9, help="EMA factor for the loss curves in [0, 1); 0 = off")
    args = ap.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        ap.error(f"--smooth {args.smooth} must be in [0, 1)")
    out = args.out_dir or str(Path(args.runs[0]) / "plots")
    try:
        paths = plot_runs(args.runs, out, args.labels.split(",") if args.labels else None, args.smooth)
    except ValueError as exc:
        print(f"anima-ft plot: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0
