"""The lab's redistribution variant: the base model distilled into its own DiT with a re-initialized adapter.

It trains like every other lab run, ``launch/train.py --config configs/lab/redistribute.yaml``
(:func:`anima_ft.lab.pipeline.launch_training`, then ``anima-ft export``), with the trainer's distillation hook
(``distill.enabled``, :mod:`anima_ft.distill`)::

    student = base DiT + adapter re-initialized with distill.reinit_seed (frozen: llm_adapter LR 0)
    teacher = the frozen base (model.init_path)
    loss    = distill on replay-class images + flow on target-class images (the stage's replay_fraction sets the mix)

Then :func:`measure` reads the run's files and the exported checkpoint and :func:`write_markdown` writes
``<run>/redistribution.md`` (+ ``redistribution.json``, every number of the text):

* training loss: the mean of the first and of the last tenth of the per-step losses in ``metrics.jsonl``;
* the teacher-gap pairing table of :mod:`anima_ft.distill.attribution` on the held-out probe images of each split
  (teacher = ``base.safetensors``, student = the export), with the plain ``no_replay`` fine-tune as a reference;
* the flow probe loss of base vs exported student, at the sigmas, noises and seed of the run's own probe.

Nothing is written in advance; ``tests/lab/test_lab_e2e.py`` recomputes every number from the files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from anima_ft.config import load_config
from anima_ft.distill import load_teacher
from anima_ft.distill.attribution import redistribution, redistribution_table
from anima_ft.eval.eval_sets import load_shard_eval_set
from anima_ft.eval.probe import evaluate_sets
from anima_ft.observability.metrics import read_metrics

logger = logging.getLogger(__name__)
NAME = "redistribute"  # run dir ft_redistribute/, export redistribute.safetensors
GAP_NUM_NOISES = 4  # fixed noises per (image, sigma) of the teacher-gap tables: 5 pairings x 2 models per draw


def loss_summary(metrics_path: Path, num_steps: int) -> dict:
    """``{"k", "first", "last", "losses", "max_grad_norm"}``: the per-step training losses of ``metrics.jsonl``
    (steps 1..num_steps must all be logged: ``logging.every_steps=1``), the means of the first and last
    ``k = max(1, N // 10)`` and the largest gradient norm (before clipping) of the run."""
    rows = read_metrics(metrics_path)
    missing = [s for s in range(1, num_steps + 1) if s not in rows]
    if missing:
        raise ValueError(f"{metrics_path} lacks steps {missing[:5]}...; the redistribution recipe must log every step "
                         "(logging.every_steps: 1)")
    losses = [rows[s]["loss"] for s in range(1, num_steps + 1)]
    k = max(1, num_steps // 10)
    return {"k": k, "first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k, "losses": losses,
            "max_grad_norm": max(rows[s]["grad_norm"] or 0.0 for s in range(1, num_steps + 1))}


def measure(lab_dir: Path, run_dir: Path, export_path: Path, probe_sets: dict[str, Path],
            references: dict[str, Path], gap_num_noises: int = GAP_NUM_NOISES) -> dict:
    """Every number of the variant's report, from the run's files and the exported checkpoint ``export_path``.

    ``probe_sets``: ``{name: shard dir}`` of held-out images; ``references``: other exports whose DiT is also paired
    with the re-initialized adapter (e.g. the plain fine-tune). The teacher gaps use ``gap_num_noises`` fixed noises
    (seed ``eval.seed``) per image and sigma; the flow probe uses the run's own ``eval`` settings.
    """
    cfg = load_config(run_dir / "config.yaml")
    ev, dcfg = cfg.eval, cfg.distill
    if not dcfg.enabled or dcfg.adapter_source != "reinit":
        raise ValueError(f"{run_dir / 'config.yaml'}: distill.enabled={dcfg.enabled}, adapter_source="
                         f"{dcfg.adapter_source!r}; the redistribution variant needs distill.enabled=true and "
                         "adapter_source=reinit")
    num_steps = sum(st.num_steps for st in cfg.stages)
    teacher = load_teacher(str(lab_dir / "base.safetensors"), dtype=torch.float32)
    student = load_teacher(str(export_path), dtype=torch.float32)
    others = {name: load_teacher(str(path), dtype=torch.float32) for name, path in references.items()}
    probes = {name: load_shard_eval_set(path, name) for name, path in probe_sets.items()}
    sigmas = list(ev.sigmas)
    probe_base = evaluate_sets(teacher, probes, sigmas, ev.num_noises, ev.seed)
    probe_student = evaluate_sets(student, probes, sigmas, ev.num_noises, ev.seed)
    per_rank = cfg.batch.micro_batch_size * cfg.batch.grad_accum_steps
    return {
        "recipe": {"num_steps": num_steps, "samples_per_rank_step": per_rank, "reinit_seed": dcfg.reinit_seed,
                   "lr": dataclasses.asdict(cfg.optim.lr), "grad_clip": cfg.optim.grad_clip,
                   "zero_stage": cfg.dist.zero_stage,
                   "replay_fraction": [st.replay_fraction for st in cfg.stages],
                   "losses": [[t.source, t.kind, t.weight] for t in dcfg.losses]},
        "training": loss_summary(run_dir / "metrics.jsonl", num_steps),
        "sigmas": sigmas, "num_noises": ev.num_noises, "gap_num_noises": gap_num_noises, "seed": ev.seed,
        "sets": {name: _logged_redistribution(name, teacher, student, samples, sigmas, dcfg.reinit_seed,
                                              gap_num_noises, ev.seed, others) for name, samples in probes.items()},
        "probe": {name: {"base": probe_base[name].mean(0).tolist(), "student": probe_student[name].mean(0).tolist()}
                  for name in probes},
    }


def _logged_redistribution(name: str, teacher, student, samples, sigmas, reinit_seed, num_noises, seed, others):
    """:func:`anima_ft.distill.attribution.redistribution` on one set, with a log line before and after (the
    pairings re-run the teacher, so a set can take a while on a loaded CPU)."""
    t0 = time.perf_counter()
    logger.info("redistribution: teacher gaps of %d pairings on %s (%d images x %d sigmas x %d noises)",
                4 + len(others), name, len(samples), len(sigmas), num_noises)
    out = redistribution(teacher, student, samples, sigmas, reinit_seed, num_noises, seed, others)
    logger.info("redistribution: %s done in %.0f s", name, time.perf_counter() - t0)
    return out


def flow_probe_table(result: dict) -> str:
    """Markdown: the flow probe loss per set and sigma, ``base -> student``."""
    sig = result["sigmas"]
    lines = ["| set | " + " | ".join(f"sigma {s:g}" for s in sig) + " |", "|---|" + "---|" * len(sig)]
    for name, row in result["probe"].items():
        lines.append(f"| {name} | " + " | ".join(f"{b:.4f} -> {s:.4f}" for b, s in zip(row["base"], row["student"]))
                     + " |")
    return "\n".join(lines)


def describe(result: dict, nproc: int, seconds: float | None) -> str:
    """The variant's setup sentence (recipe values, the run's ranks and time)."""
    rec = result["recipe"]
    fractions = sorted(set(rec["replay_fraction"]))
    if fractions == [1.0]:
        mix = "replay-class images only, distill loss against the frozen base (no target fine-tuning)"
    elif -1.0 in fractions:
        mix = "target and replay images in the recipe's source weights (replay: distill loss against the frozen base)"
    else:
        mix = (f"a replay fraction {', '.join(f'{f:g}' for f in fractions)} of each batch with the distill loss "
               "against the frozen base, the rest target-class images with the flow loss")
    lr = rec["lr"]
    took = "reused finished run" if seconds is None else f"{seconds:.0f} s"
    return (f"Student: base DiT + adapter re-initialized (seed {rec['reinit_seed']}), adapter LR "
            f"{lr['llm_adapter']:g}, DiT LR {lr['base']:g}; {rec['num_steps']} steps of `launch/train.py` "
            f"(torch AdamW in DeepSpeed ZeRO-{rec['zero_stage']}, gradient clip {rec['grad_clip']:g}, {nproc} CPU ranks x "
            f"{rec['samples_per_rank_step']} samples): {mix}; "
            f"{took} including the export. Loss terms: "
            + ", ".join(f"{s} {k} x{w:g}" for s, k, w in rec["losses"]) + ".")


def write_markdown(result: dict, out_dir: Path, nproc: int, seconds: float | None) -> Path:
    """Write ``out_dir/redistribution.md`` and ``out_dir/redistribution.json`` from :func:`measure`'s result."""
    tr = result["training"]
    lines = ["# Redistribution variant (distill into the DiT with a re-initialized adapter)", "",
             describe(result, nproc, seconds), "",
             f"Training loss (`metrics.jsonl`): first {tr['k']} steps {tr['first']:.4f}, last {tr['k']} steps "
             f"{tr['last']:.4f}; largest gradient norm {tr['max_grad_norm']:.3f}.", "",
             "## Teacher gap of DiT / adapter pairings (mean squared velocity difference to the base; relative in "
             f"parentheses; {result['gap_num_noises']} fixed noises per image and sigma, exported checkpoint)", ""]
    for name, red in result["sets"].items():
        lines += [f"### {name} (held-out probe images)", "", redistribution_table(red), ""]
    lines += [f"## Flow probe loss ({result['num_noises']} fixed noises per image and sigma, as in the run's probe), "
              "base vs exported student", "",
              flow_probe_table(result)]
    (out_dir / "redistribution.json").write_text(json.dumps(result))
    path = out_dir / "redistribution.md"
    path.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", path)
    return path
