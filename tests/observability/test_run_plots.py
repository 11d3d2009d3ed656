"""``anima-ft plot``: the smoothing formula, the series read from metrics.jsonl, stage marks, and the PNGs."""

from __future__ import annotations

import json
import math

import pytest

from anima_ft.observability import run_plots


def _write_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return run_dir


def test_ema_is_the_bias_corrected_formula_and_skips_nonfinite():
    xs = [4.0, 2.0, float("nan"), 1.0]
    a = 0.5
    m1 = (1 - a) * 4.0
    m2 = a * m1 + (1 - a) * 2.0
    m3 = a * m2 + (1 - a) * 1.0
    want = [m1 / (1 - a), m2 / (1 - a**2), m2 / (1 - a**2), m3 / (1 - a**3)]
    got = run_plots.ema(xs, a)
    assert got == pytest.approx(want, rel=1e-15)
    assert run_plots.ema(xs, 0.0)[:2] == [4.0, 2.0]
    assert math.isnan(run_plots.ema([float("inf")], 0.9)[0])


def test_series_and_stage_starts_follow_the_rows(tmp_path):
    rows = {0: {"step": 0, "probe/replay/mean_rel": 1.0},
            1: {"step": 1, "loss": 2.0, "stage": 0, "grad_norm": None},
            2: {"step": 2, "loss": 1.5, "stage": 0, "grad_norm": 0.7},
            3: {"step": 3, "loss": 1.2, "stage": 1, "grad_norm": 0.5}}
    assert run_plots.series(rows, "loss") == ([1, 2, 3], [2.0, 1.5, 1.2])
    assert run_plots.series(rows, "grad_norm") == ([2, 3], [0.7, 0.5])  # None rows are gaps, not zeros
    assert run_plots.stage_starts(rows) == [3]


def test_cli_writes_loss_stats_and_probe_pngs_for_two_runs(tmp_path, capsys):
    def rows(scale):
        out = [{"step": 0, "probe/replay/mean_rel": 1.0, "probe/replay/mean": 0.5}]
        for s in range(1, 21):
            out.append({"step": s, "stage": int(s > 10), "loss": scale / s, "loss/target": scale / s,
                        "loss/replay": 2 * scale / s, "lr/mlp": 1e-4, "lr/llm_adapter": 0.0 if s <= 10 else 1e-5,
                        "grad_norm": 1.0, "samples_per_s": 10.0, "peak_mem_gb": 1.5})
            if s % 10 == 0:
                out.append({"step": s, "stage": int(s > 10), "loss": scale / s, "probe/replay/mean_rel": 1 + s / 100})
        return out

    a = _write_run(tmp_path / "replay25", rows(1.0))
    b = _write_run(tmp_path / "no_replay", rows(2.0))
    out = tmp_path / "plots"
    assert run_plots.main([str(a), str(b), "--out-dir", str(out)]) == 0
    for name in ("loss.png", "train_stats.png", "probe.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "wrote" in capsys.readouterr().out
    # a run without probe metrics gets no probe.png; a directory without metrics.jsonl is a clear error
    c = _write_run(tmp_path / "plain", rows(1.0)[1:3])
    assert run_plots.main([str(c)]) == 0
    assert (c / "plots" / "loss.png").exists() and not (c / "plots" / "probe.png").exists()
    assert run_plots.main([str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_plotted_curves_are_the_metrics_series(tmp_path, monkeypatch):
    """What the PNGs show: each panel's lines carry exactly the metrics.jsonl series (raw and EMA-smoothed loss per
    run, probe ratios), the stage boundary is drawn at the first step of stage 1, and the legends name the runs."""
    captured = {}
    real_save = run_plots._save

    def grab(fig, path):
        captured[path.name] = [
            {"title": ax.get_title(), "legend": [t.get_text() for t in ax.get_legend().get_texts()]
             if ax.get_legend() else [],
             "lines": [(list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata()))) for ln in ax.get_lines()]}
            for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(run_plots, "_save", grab)
    rows = [{"step": 0, "probe/replay/mean_rel": 1.0}]
    for s in range(1, 7):
        rows.append({"step": s, "stage": int(s > 3), "loss": 1.0 / s, "loss/target": 1.0 / s, "loss/replay": 2.0 / s})
    rows[-1]["probe/replay/mean_rel"] = 1.25  # the trainer logs one row per step, probe included
    run = _write_run(tmp_path / "r", rows)
    assert run_plots.main([str(run), "--out-dir", str(tmp_path / "p"), "--smooth", "0.5"]) == 0

    steps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    total = [1.0 / s for s in range(1, 7)]
    loss_axes = captured["loss.png"]
    assert [ax["title"] for ax in loss_axes] == ["loss", "loss on replay", "loss on target"]
    raw, smooth, stage_line = loss_axes[0]["lines"][:3]
    assert raw == (steps, pytest.approx(total, rel=1e-12))
    assert smooth == (steps, pytest.approx(run_plots.ema(total, 0.5), rel=1e-12))
    assert stage_line[0] == [4.0, 4.0]  # axvline at the first step of stage 1
    assert loss_axes[1]["lines"][0][1] == pytest.approx([2.0 / s for s in range(1, 7)], rel=1e-12)
    assert loss_axes[0]["legend"] == ["r"]
    (probe_ax,) = captured["probe.png"]
    assert probe_ax["lines"][0] == ([0.0, 6.0], [1.0, 1.25])
