"""End to end: ``anima-ft lab --quick`` (prepare, deepspeed with 2 CPU ranks and ZeRO-2, probe, export, drift,
grids, report), then every number of report.md is checked against the run's own files, recomputed here; a second run
reuses the prepared shards and reproduces the base model and the probe bit for bit."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
VARIANTS = ("no_replay", "replay25", "adapter_frozen_first")
SETS = ("replay_classes", "target_classes")


def _lab(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "anima_ft.cli", "lab", "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "run"
    _lab(out)
    return out


def _probe_lines(lab: Path, variant: str) -> list[dict]:
    return [json.loads(line) for line in (lab / f"ft_{variant}" / "probe.jsonl").read_text().splitlines()]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _section(report: str, variant: str) -> str:
    return report.split(f"### {variant}\n", 1)[1].split("\n#", 1)[0]


def test_probe_tables_match_probe_files(lab_dir):
    report = (lab_dir / "report.md").read_text()
    first_steps = {}
    for variant in VARIANTS:
        lines = _probe_lines(lab_dir, variant)
        assert [rec["step"] for rec in lines] == [0, 10, 20]
        first_steps[variant] = lines[0]["per_image"]
        section = _section(report, variant)
        for s in SETS:
            sigmas = lines[0]["sigmas"]
            start = [_mean(row[j] for row in lines[0]["per_image"][s]) for j in range(len(sigmas))]
            end = [_mean(row[j] for row in lines[-1]["per_image"][s]) for j in range(len(sigmas))]
            for j, sigma in enumerate(sigmas):
                # the trainer-side metric names agree with the per-image table
                assert abs(lines[-1]["metrics"][f"probe/{s}/sigma_{sigma:g}"] - end[j]) < 1e-12
                row = f"| {s} | {sigma:g} | {start[j]:.4f} | {end[j]:.4f} | {end[j] - start[j]:+.4f} | "
                assert row in section, f"{variant}: missing {row!r} in\n{section}"
            rel = _mean(end) / _mean(start) - 1
            assert f"| {s} | **mean** | {_mean(start):.4f} | {_mean(end):.4f} |" in section
            assert f"{100 * rel:+.1f}% |" in section
    # every variant starts from the same base weights and the same probe noises
    assert first_steps["no_replay"] == first_steps["replay25"] == first_steps["adapter_frozen_first"]


def test_interpretation_matches_recomputed_rises(lab_dir):
    report = (lab_dir / "report.md").read_text()

    def held_rise(variant):
        lines = _probe_lines(lab_dir, variant)
        start, end = (_mean(_mean(row) for row in lines[k]["per_image"]["replay_classes"]) for k in (0, -1))
        return end / start - 1

    r0 = held_rise("no_replay")
    for variant in ("replay25", "adapter_frozen_first"):
        r = held_rise(variant)
        if r0 <= 0:
            expected = "cannot show a reduction of forgetting"
        elif r <= 0:
            expected = "prevented the rise of held-out loss entirely"
        elif r < r0:
            expected = f"reduced the rise of held-out loss by {100 * (1 - r / r0):.0f}%"
        else:
            expected = "did not reduce the rise of held-out loss"
        line = next(ln for ln in report.splitlines() if ln.startswith(f"- **{variant}** ") and "held-out" in ln)
        assert expected in line, line


def test_drift_table_matches_checkpoints(lab_dir):
    report = (lab_dir / "report.md").read_text()
    base = load_file(str(lab_dir / "base.safetensors"))
    with open(lab_dir / "drift" / "drift_kinds.csv", newline="") as fh:
        rows = {(r["variant"], r["kind"]): float(r["rel_change"]) for r in csv.DictReader(fh)}
    for variant in VARIANTS:
        final = load_file(str(lab_dir / f"{variant}.safetensors"))
        adapter = [k for k in base if k.startswith("net.llm_adapter.")]
        dit = [k for k in base if not k.startswith("net.llm_adapter.") and ".pos_embedder." not in k]
        for kind, keys in (("llm_adapter", adapter), ("dit", dit)):
            num = sum((final[k].double() - base[k].double()).pow(2).sum() for k in keys)
            den = sum(base[k].double().pow(2).sum() for k in keys)
            assert abs(float((num / den).sqrt()) - rows[(variant, kind)]) < 1e-9
        cells = " | ".join(f"{rows[(variant, k)]:.4f}" for k in ("llm_adapter", "adapter_blocks", "adapter_embed",
                                                                  "dit"))
        assert f"| {variant} | {cells} |" in report
    # the adapter was frozen for the first stage of that variant: it moved less than with no freezing
    assert rows[("adapter_frozen_first", "llm_adapter")] < rows[("no_replay", "llm_adapter")]


def test_report_lists_seed_configs_and_pictures(lab_dir):
    report = (lab_dir / "report.md").read_text()
    assert "Seed **0**" in report
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (lab_dir / rel).stat().st_size > 1000, rel
    for variant in VARIANTS:
        assert f"ft_{variant}/config.yaml" in report and (lab_dir / f"ft_{variant}" / "config.yaml").exists()
    with open(lab_dir / "grids" / "sample_accuracy.csv", newline="") as fh:
        acc = {(r["checkpoint"], r["prompts"]): (float(r["accuracy"]), int(r["num_samples"]))
               for r in csv.DictReader(fh)}
    for name in ("real probe images", "base", *VARIANTS):
        cells = [f"{100 * a:.1f}% ({round(a * n)}/{n})" for a, n in (acc[(name, "target")], acc[(name, "replay")])]
        assert f"| {name} | {cells[0]} | {cells[1]} |" in report
    summary = json.loads((lab_dir / "lab_summary.json").read_text())
    assert summary["meta"]["seed"] == 0 and not summary["meta"]["failed"]


def test_second_run_reuses_shards_and_is_deterministic(lab_dir, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    shutil.copytree(lab_dir / "data", out / "data")
    before = {p: p.stat().st_mtime_ns for p in (out / "data" / "shards").rglob("*.tar")}
    _lab(out, "--variants", "no_replay")
    assert {p: p.stat().st_mtime_ns for p in (out / "data" / "shards").rglob("*.tar")} == before
    assert "prepare (reused shards)" in (out / "report.md").read_text()
    a, b = load_file(str(lab_dir / "base.safetensors")), load_file(str(out / "base.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _probe_lines(lab_dir, "no_replay") == _probe_lines(out, "no_replay")
