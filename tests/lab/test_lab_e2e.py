"""End to end: ``anima-ft lab --quick --full`` (prepare, deepspeed with 2 CPU ranks and ZeRO-2, probe, export, drift,
grids, the replay / preservation comparison, the redistribution variant through the same trainer, Question 2's
runs and attribution, report), then every
number of report.md is checked against the run's own files, recomputed here; a second run reuses the prepared shards
and reproduces the base model and the probe bit for bit."""

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
VARIANTS = ("no_replay", "replay25", "preserve", "replay_preserve", "no_replay_seed1", "adapter_frozen_first")
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
    proc = _lab(out, "--full")
    (out / "lab_stderr.txt").write_text(proc.stderr)
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
    # every variant starts from the same base weights and the same probe noises (also the second training seed)
    assert all(first_steps[v] == first_steps["no_replay"] for v in VARIANTS)


def test_interpretation_matches_recomputed_rises(lab_dir):
    report = (lab_dir / "report.md").read_text()

    def held_rise(variant):
        lines = _probe_lines(lab_dir, variant)
        start, end = (_mean(_mean(row) for row in lines[k]["per_image"]["replay_classes"]) for k in (0, -1))
        return end / start - 1

    r0 = held_rise("no_replay")
    for variant in VARIANTS[1:]:
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


def _paired(a, b):
    d = [x - y for x, y in zip(a, b, strict=True)]
    m = _mean(d)
    return m, (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def test_q1_section_matches_probe_metrics_and_configs(lab_dir):
    """The replay / preservation comparison: every cell recomputed from probe.jsonl, metrics.jsonl and the configs."""
    from statistics import median

    from anima_ft.config import load_config

    report = (lab_dir / "report.md").read_text()
    section = report.split("## Question 1: replay or output preservation?\n", 1)[1].split("\n## ", 1)[0]
    # the preservation runs: distill with the student's own adapter against the frozen base (= model.init_path)
    for name, kinds in (("preserve", {"target": "flow", "replay": "distill"}),
                        ("replay_preserve", {"target": "flow", "replay": "flow", "preserve": "distill"})):
        cfg = load_config(lab_dir / f"ft_{name}" / "config.yaml")
        assert cfg.distill.enabled and cfg.distill.adapter_source == "own" and cfg.distill.teacher == "live"
        assert cfg.distill.teacher_path == "" and cfg.model.init_path == str(lab_dir / "base.safetensors")
        assert {t.source: t.kind for t in cfg.distill.losses} == kinds
        assert "launch/train.py" in (lab_dir / f"ft_{name}" / "command.txt").read_text()
    shares = {"no_replay": 0, "replay25": 0, "preserve": 0.25, "replay_preserve": 0.125, "no_replay_seed1": 0}
    end = {v: {s: [_mean(row) for row in _probe_lines(lab_dir, v)[-1]["per_image"][s]] for s in SETS} for v in shares}
    for v, share in shares.items():
        lines = _probe_lines(lab_dir, v)
        start = {s: _mean(_mean(row) for row in lines[0]["per_image"][s]) for s in SETS}
        forgetting = _mean(end[v]["replay_classes"]) / start["replay_classes"] - 1
        gain = 1 - _mean(end[v]["target_classes"]) / start["target_classes"]
        (dh, sh), (dt, st) = (_paired(end[v][s], end["no_replay"][s]) for s in SETS)
        cfg = load_config(lab_dir / f"ft_{v}" / "config.yaml")
        batch = cfg.batch.micro_batch_size * 2
        rows = [json.loads(ln) for ln in (lab_dir / f"ft_{v}" / "metrics.jsonl").read_text().splitlines()]
        step_s = batch / median(r["samples_per_s"] for r in rows if "loss" in r and r.get("samples_per_s"))
        row = (f"| {v} | {100 * forgetting:+.1f}% | {100 * gain:+.1f}% | {dh:+.4f} +- {sh:.4f} | {dt:+.4f} +- "
               f"{st:.4f} | {step_s:.3f} | {share * batch:g} of {batch} |")
        assert row in section, f"missing {row!r} in\n{section}"
    (fh, fsh), (ft, fst) = (_paired(end["no_replay_seed1"][s], end["no_replay"][s]) for s in SETS)
    assert (f"differs from `no_replay` by {fh:+.4f} +- {fsh:.4f} on the held-out images and {ft:+.4f} +- {fst:.4f} "
            "on the target images") in section
    treatments = ("replay25", "preserve", "replay_preserve")
    for i, a in enumerate(treatments):
        for b in treatments[i + 1:]:
            d, se = _paired(end[a]["replay_classes"], end[b]["replay_classes"])
            assert f"- {a} - {b}: {d:+.4f} +- {se:.4f}" in section
    # the verdict names the treatment with the lowest held-out end loss, and calls it clear only by the stated rule
    best = min(treatments, key=lambda n: _mean(end[n]["replay_classes"]))
    others = [o for o in treatments if o != best]
    clear = all(abs(d) > 2 * se and abs(d) > abs(fh) for d, se in (_paired(end[best]["replay_classes"],
                                                                            end[o]["replay_classes"]) for o in others))
    expected = (f"**{best}** controlled forgetting best" if clear else
                f"**{best}** has the lowest held-out end loss, but")
    assert expected in section
    ft = _paired(end["no_replay_seed1"]["target_classes"], end["no_replay"]["target_classes"])[0]
    for v in treatments:
        d, se = _paired(end[v]["target_classes"], end["no_replay"]["target_classes"])
        word = "clear" if abs(d) > 2 * se and abs(d) > abs(ft) else "not clear"
        assert f"{v} {d:+.4f} +- {se:.4f} ({word})" in section
    summary = json.loads((lab_dir / "lab_summary.json").read_text())
    assert summary["q1"]["treatments"] == list(treatments)


def test_every_phase_and_training_run_logs_progress(lab_dir):
    """The terminal shows each phase and, for every training run, a step/ETA line (at least every 10 s)."""
    stderr = (lab_dir / "lab_stderr.txt").read_text()
    for run in ("pretrain", *(f"ft_{v}" for v in VARIANTS), "ft_redistribute"):
        assert re.search(rf"{run}: (starting|step \d+/\d+ \(\d+%\), [\d.]+ steps/s, ETA)", stderr) or re.search(
            rf"{run}: finished with exit code 0 at step (\d+)/\1 \(\d+ s\)", stderr), run  # < 10 s: no interval
    for phase in ("prepare", "base model", "fine-tunes", "drift", "sample grids", "redistribution variant",
                  "Question 2"):
        assert f"phase {phase}" in stderr
    for run in ("dit_first", "ft_joint", "ft_joint_seed1", "ft_adapter_frozen_first", "ft_redistributed"):
        assert re.search(rf"{run}: finished with exit code 0 at step (\d+)/\1 \(\d+ s\)", stderr), run


def test_q2_section_matches_the_runs_and_their_exports(lab_dir):
    """Question 2: recipes as documented, the redistribution student's adapter is the base's bitwise, every probe
    loss recomputed here from the exports, the summary recomputed from those, the section printed from it, the
    trainers' own first/last probes agree, and the sample table equals samples.csv."""
    from anima_ft.config import load_config
    from anima_ft.eval.eval_sets import load_shard_eval_set
    from anima_ft.lab import concept_report, concept_share, concepts

    q2 = lab_dir / "q2"
    result = json.loads((q2 / "concepts.json").read_text())
    cfgs = {name: load_config(q2 / path) for name, path in result["configs"].items()}
    base_cfg = cfgs[concepts.BASE]
    assert base_cfg.optim.lr.llm_adapter == 0 and not base_cfg.model.init_path
    assert base_cfg.optim.lr.cross_attn > 0
    for name in (*concepts.RUNS, concepts.REDISTRIBUTED):
        assert "launch/train.py" in (q2 / f"ft_{name}" / "command.txt").read_text()
    joint = cfgs["joint"]
    assert joint.model.init_path == str(q2 / "dit_first.safetensors") and joint.optim.lr.llm_adapter > 0
    assert [s.name for s in joint.data.sources] == ["styled", "plain"]
    ff = cfgs["adapter_frozen_first"]
    assert ff.stages[0].lr.llm_adapter == 0 and len(ff.stages) == 2
    assert cfgs["joint_seed1"].run.seed == joint.run.seed + 1
    red = cfgs[concepts.REDISTRIBUTED]
    assert red.distill.enabled and red.distill.adapter_source == "own" and red.optim.lr.llm_adapter == 0
    assert red.distill.teacher_path == str(q2 / "joint.safetensors")
    assert red.model.init_path == str(q2 / concepts.START)
    # the student starts from the joint DiT with the base adapter, and its adapter never moves
    files = {n: load_file(str(q2 / f"{n}.safetensors")) for n in (concepts.BASE, "joint", concepts.REDISTRIBUTED)}
    start = load_file(str(q2 / concepts.START))
    for k, v in start.items():
        src = concepts.BASE if k.startswith("net.llm_adapter.") else "joint"
        assert torch.equal(v, files[src][k]), k
        if k.startswith("net.llm_adapter."):
            assert torch.equal(files[concepts.REDISTRIBUTED][k], v), k
    assert any(not torch.equal(files["joint"][k], files[concepts.BASE][k]) for k in start if "llm_adapter" in k)
    assert result["probe"]["adapter_identical"] is True
    # every probe loss, recomputed from the exports
    shards = q2 / "data" / "shards"
    probes = {s: load_shard_eval_set(shards / f"{s}_probe", s) for s in concept_share.SETS}
    exports = {n: q2 / f"{n}.safetensors" for n in (concepts.BASE, *concepts.RUNS, concepts.REDISTRIBUTED)}
    pr = result["probe"]
    pairs = [tuple(k.split("|")) for k in pr["losses"] if k not in pr["filled"]]
    again = concept_share.probe_pairs(exports, pairs, probes, pr["sigmas"], pr["num_noises"], pr["seed"])
    for key, per in again.items():
        for s in concept_share.SETS:
            assert _close(pr["losses"][key][s], per[s], 1e-12), (key, s)
    for dst, src in pr["filled"].items():
        assert pr["losses"][dst] == pr["losses"][src]
    summary = concept_share.summarize(pr["losses"], concepts.BASE, [*concepts.RUNS, concepts.REDISTRIBUTED],
                                      concepts.FLOOR, concepts.REDISTRIBUTED, seed=result["settings"]["seed"])
    assert json.loads(json.dumps(summary)) == result["summary"]
    md = (q2 / "concepts.md").read_text()
    concept_report.write_markdown(result, q2)
    assert (q2 / "concepts.md").read_text() == md
    section = (lab_dir / "report.md").read_text().split("\n## Question 2: where does a new concept's knowledge go?", 1)[1]
    for line in md.splitlines():
        if line.startswith("| ") or line.startswith("- "):
            assert line in section, line
    # the trainers' own probes: step 0 = the base (same weights, sigmas, noises), last step = the export up to bf16
    for name in (*concepts.RUNS, concepts.REDISTRIBUTED):
        lines = _probe_lines(q2, name)
        steps = sum(st.num_steps for st in cfgs[name].stages)
        assert [rec["step"] for rec in lines] == [0, steps]
        first = [_mean(row) for row in lines[0]["per_image"]["styled"]]
        last = [_mean(row) for row in lines[-1]["per_image"]["styled"]]
        start_key = f"{concepts.BASE}|{concepts.BASE}" if name != concepts.REDISTRIBUTED else f"joint|{concepts.BASE}"
        assert _close(first, pr["losses"][start_key]["styled"], 1e-9), name
        assert _close(last, pr["losses"][f"{name}|{name}"]["styled"], 5e-3), name
    # samples
    with open(q2 / "grids" / "samples.csv", newline="") as fh:
        rows = {r["checkpoint"]: r for r in csv.DictReader(fh)}
    assert rows.keys() == result["samples"]["accuracy"].keys()
    for label, acc in result["samples"]["accuracy"].items():
        assert float(rows[label]["style_accuracy"]) == acc["style"] and int(rows[label]["num_samples"]) == acc["n"]
    for path in result["samples"]["grids"].values():
        assert Path(path).is_file()
