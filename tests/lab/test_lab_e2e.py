"""End to end: ``anima-ft lab --quick`` (prepare, deepspeed with 2 CPU ranks and ZeRO-2, probe, export, drift,
grids, the redistribution variant through the same trainer, report), then every number of report.md is checked
against the run's own files, recomputed here; a second run reuses the prepared shards and reproduces the base model
and the probe bit for bit."""

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


def _close(a, b, rel: float) -> bool:
    return all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def test_redistribution_section_matches_the_trainer_run_and_its_export(lab_dir):
    from anima_ft.config import load_config
    from anima_ft.distill import load_teacher
    from anima_ft.distill.attribution import redistribution, redistribution_table, reinit_adapter
    from anima_ft.eval.eval_sets import load_shard_eval_set
    from anima_ft.eval.probe import evaluate_sets
    from anima_ft.lab.redistribution import flow_probe_table

    run = lab_dir / "ft_redistribute"
    section = (lab_dir / "report.md").read_text().split("\n## Redistribution variant", 1)[1]
    result = json.loads((run / "redistribution.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert cfg.distill.enabled and cfg.distill.adapter_source == "reinit" and cfg.optim.lr.llm_adapter == 0
    assert "launch/train.py" in (run / "command.txt").read_text()
    # the export: the base's DiT moved, the adapter is exactly the seeded re-initialized one (LR 0: never trained)
    base, student = load_file(str(lab_dir / "base.safetensors")), load_file(str(lab_dir / "redistribute.safetensors"))
    teacher = load_teacher(str(lab_dir / "base.safetensors"), dtype=torch.float32)
    fresh = reinit_adapter(teacher, cfg.distill.reinit_seed).state_dict()
    assert all(torch.equal(student[f"net.llm_adapter.{k}"], v.to(torch.bfloat16)) for k, v in fresh.items())
    dit = [k for k in base if not k.startswith("net.llm_adapter.")]
    assert sum(not torch.equal(student[k], base[k]) for k in dit) > len(dit) // 2
    # training loss: every step of metrics.jsonl, replay (distill) samples only
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps = sum(st.num_steps for st in cfg.stages)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and steps == 20
    assert all(r["loss"] == r["loss/replay"] for r in rows)
    losses, k = [r["loss"] for r in rows], max(1, steps // 10)
    assert f"first {k} steps {_mean(losses[:k]):.4f}, last {k} steps {_mean(losses[-k:]):.4f}; " in section
    # teacher-gap tables: recomputed here from the exported files; the report prints redistribution.json's numbers
    model = load_teacher(str(lab_dir / "redistribute.safetensors"), dtype=torch.float32)
    refs = {"no_replay fine-tune": load_teacher(str(lab_dir / "no_replay.safetensors"), dtype=torch.float32)}
    probes = {s: load_shard_eval_set(lab_dir / "data" / "shards" / f"{s.split('_')[0]}_probe", s) for s in SETS}
    ev = cfg.eval
    for s in SETS:
        red = redistribution(teacher, model, probes[s], ev.sigmas, cfg.distill.reinit_seed, result["gap_num_noises"],
                             ev.seed, refs)
        got = result["sets"][s]
        assert got["rows"].keys() == red["rows"].keys()
        for name, row in red["rows"].items():
            assert _close(got["rows"][name]["gap"], row["gap"], 1e-9) and _close(got["rows"][name]["rel"], row["rel"],
                                                                                 1e-9), (s, name)
        assert _close(got["shift"], red["shift"], 1e-7)
        assert f"### {s} (held-out probe images)\n\n{redistribution_table(got)}\n" in section
    assert f"{result['gap_num_noises']} fixed noises per image and sigma, exported checkpoint)" in section
    # flow probe, base -> exported student: recomputed here; the base agrees with the fine-tunes' step-0 probe (same
    # base model, sigmas, noises) and the student with its own run's last probe (the export is bf16-rounded)
    probe_base, probe_student = (evaluate_sets(m, probes, ev.sigmas, ev.num_noises, ev.seed) for m in (teacher, model))
    first, last = _probe_lines(lab_dir, "no_replay")[0], _probe_lines(lab_dir, "redistribute")[-1]
    assert [rec["step"] for rec in _probe_lines(lab_dir, "redistribute")] == [0, steps]
    for s in SETS:
        assert _close(result["probe"][s]["base"], probe_base[s].mean(0).tolist(), 1e-9)
        assert _close(result["probe"][s]["student"], probe_student[s].mean(0).tolist(), 1e-9)
        step0 = [_mean(row[j] for row in first["per_image"][s]) for j in range(len(ev.sigmas))]
        trained = [_mean(row[j] for row in last["per_image"][s]) for j in range(len(ev.sigmas))]
        assert _close(result["probe"][s]["base"], step0, 1e-9)
        assert _close(result["probe"][s]["student"], trained, 2e-3)
    assert flow_probe_table(result) in section


def test_report_lists_seed_configs_and_pictures(lab_dir):
    report = (lab_dir / "report.md").read_text()
    assert "Seed **0**" in report
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (lab_dir / rel).stat().st_size > 1000, rel
    for variant in (*VARIANTS, "redistribute"):
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
    _lab(out, "--variants", "no_replay", "--no-distill")
    assert {p: p.stat().st_mtime_ns for p in (out / "data" / "shards").rglob("*.tar")} == before
    assert "prepare (reused shards)" in (out / "report.md").read_text()
    a, b = load_file(str(lab_dir / "base.safetensors")), load_file(str(out / "base.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _probe_lines(lab_dir, "no_replay") == _probe_lines(out, "no_replay")
