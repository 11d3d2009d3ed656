"""``anima-ft lab``: the CPU mini-lab. Forgetting and replay on real images, end to end, in about five minutes.

1. prepare: scikit-learn's handwritten digits (captioned from their labels) -> PCA patch codec latents (a stand-in
   for the Qwen-Image VAE, demo only) + a tiny Qwen3 / word-level tokenizers -> shards via ``anima_ft.data.prepare``.
2. base: a tiny Anima (DiT + adapter) trained from random init on all ten classes (``deepspeed``, 2 CPU ranks,
   ZeRO-2; recipe ``configs/lab/pretrain.yaml``).
3. fine-tunes from that base on the target classes, one per recipe ``configs/lab/ft_*.yaml``: no replay, 25% replay,
   adapter frozen for the first stage. The fixed-sigma probe runs on held-out images of the replay classes and of
   the target classes at step 0 and every ``eval.probe_every_steps`` steps.
4. drift of adapter and DiT groups against the base, sample grids decoded by the codec, and ``report.md``.
5. the redistribution variant (:mod:`anima_ft.lab.redistribution`, recipe ``configs/lab/redistribute.yaml``):
   the base distilled into its own DiT with a re-initialized adapter by the same trainer, measured on its export;
   its section is appended to ``report.md``.

Deterministic for a seed; a second run with the same data settings reuses the prepared shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from anima_ft.eval.probe import read_probe_log
from anima_ft.lab import compare, pipeline
from anima_ft.lab.report import VariantResult, mean, write_report

logger = logging.getLogger(__name__)
VARIANTS = {  # name: (recipe, description, training-seed offset)
    "no_replay": ("ft_no_replay.yaml", "Target digits only; every parameter group trainable.", 0),
    "replay25": ("ft_replay25.yaml", "Every batch: 75% target digits, 25% replay-class digits (training images).", 0),
    "preserve": ("ft_preserve.yaml",
                 "Every batch: 75% target digits (flow loss), 25% replay-class digits whose loss is the squared "
                 "difference to the frozen base model's velocity (output preservation, `distill.enabled`, own "
                 "adapter).", 0),
    "replay_preserve": ("ft_replay_preserve.yaml",
                        "Every batch: 75% target digits, 12.5% replay-class digits with the flow loss (replay), "
                        "12.5% with the preservation loss against the frozen base.", 0),
    "no_replay_seed1": ("ft_no_replay.yaml",
                        "The no_replay recipe with the next training seed (data order, noise draws; same base and "
                        "probe): the noise floor every difference is compared with.", 1),
    "adapter_frozen_first": ("ft_adapter_frozen_first.yaml",
                             "Target digits only; the LLM adapter is frozen (LR 0) for the first half of the steps, "
                             "then every group trains.", 0),
}
DEFAULT_VARIANTS = ("no_replay", "replay25", "preserve", "replay_preserve", "no_replay_seed1")
FLOOR = "no_replay_seed1"
HELD_OUT, TARGET = "replay_classes", "target_classes"
# codec_normalize: PCAPatchCodec.fit's normalize; "global" read worse in docs/lab.md's measurements
DEFAULT = {"pretrain_steps": 250, "finetune_steps": 150, "probe_every": 50, "probe_per_class": 6,
           "max_train_per_class": 0, "grid_per_class": 4, "scored_per_class": 10, "grid_steps": 16,
           "codec_normalize": "channel", "q2_pretrain_steps": 400}
QUICK = {"pretrain_steps": 60, "finetune_steps": 20, "probe_every": 10, "probe_per_class": 3,
         "max_train_per_class": 40, "grid_per_class": 2, "scored_per_class": 3, "grid_steps": 6,
         "codec_normalize": "channel", "q2_pretrain_steps": 60}
GUIDANCE = 5.0  # CFG scale of the sample grids (against the empty caption); docs/lab.md has the sweep


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line flags (``--quick`` shortens everything for the end-to-end test)."""
    ap = argparse.ArgumentParser(prog="anima-ft lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lab"), help="lab directory (report.md goes here)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data splits, codec, text stack, model, noise, probe")
    ap.add_argument("--quick", action="store_true", help="tiny version (~2-3 min): fewer images and steps")
    ap.add_argument("--full", action="store_true",
                    help="also the adapter_frozen_first fine-tune and the redistribution variant (the default run "
                         f"trains {', '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--target-classes", default="0,1,2", help="digits of the fine-tuning target (rest = replay)")
    ap.add_argument("--nproc", type=int, default=2, help="deepspeed ranks (CPU processes)")
    ap.add_argument("--configs", type=Path, default=pipeline.REPO_ROOT / "configs" / "lab", help="recipe folder")
    ap.add_argument("--variants", default="", help=f"comma-separated subset of {list(VARIANTS)} (default: "
                    f"{','.join(DEFAULT_VARIANTS)}; with --full all of them)")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="override the base model's steps (0 = preset)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="override each fine-tune's steps (0 = preset)")
    ap.add_argument("--no-distill", action="store_true",
                    help="with --full: skip the redistribution variant (distill the base into its DiT with a "
                         "re-initialized adapter, anima_ft/distill) that --full otherwise runs after the fine-tunes")
    ap.add_argument("--no-concepts", action="store_true",
                    help="with --full: skip Question 2 (a DiT-first base, named styles learned jointly, adapter-swap "
                         "attribution; anima_ft/lab/concepts.py) that --full otherwise runs last")
    ap.add_argument("--distill-recipe", type=Path, default=pipeline.REPO_ROOT / "configs" / "lab" / "redistribute.yaml",
                    help="recipe of the redistribution variant (with --reuse-runs, a changed recipe reruns only this "
                         "variant)")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="skip training runs whose directory holds a finished run of the same command (for iterating "
                         "on the report); off by default: every run trains afresh")
    return ap.parse_args(argv)


def variant_from_probe(name: str, description: str, probe_path: Path) -> VariantResult:
    """Build the report's view of one fine-tune from its ``probe.jsonl``."""
    lines = read_probe_log(probe_path) if probe_path.is_file() else []
    if not lines:
        raise RuntimeError(f"{probe_path} is missing or empty: the trainer's probe did not run")
    steps = [rec["step"] for rec in lines]
    curve = {s: [[mean(col) for col in zip(*rec["per_image"][s])] for rec in lines] for s in lines[0]["per_image"]}
    end = {s: [mean(row) for row in lines[-1]["per_image"][s]] for s in lines[-1]["per_image"]}
    return VariantResult(name, description, steps, curve, end)


def setup_lines(args: argparse.Namespace, preset: dict, target: tuple[int, ...], counts: dict[str, int]) -> list[str]:
    """The report's "Setup" bullet list: data, stand-in encoders, model and schedule, recipes, mode."""
    return [
        f"- Data: scikit-learn handwritten digits (8x8 scans upscaled to 32x32), captioned from their labels. Target "
        f"classes {list(target)}; replay classes {[c for c in range(10) if c not in target]}. Training images: "
        f"{counts['target_train']} target, {counts['replay_train']} replay. Held-out probe images (never trained "
        f"on): {counts['replay_probe']} of the replay classes (set `{HELD_OUT}`), {counts['target_probe']} of the "
        f"target classes (set `{TARGET}`).",
        "- Latents: a PCA patch codec fitted on the training images (8x8 RGB patches -> 16 channels, a 4x4 latent; "
        f"normalization `{preset['codec_normalize']}`), a stand-in for the Qwen-Image VAE used by the real pipeline. "
        "Text: a tiny random Qwen3 (width 32) and word-level tokenizers built from the caption vocabulary, "
        "stand-ins for Qwen3-0.6B and the T5 tokenizer.",
        f"- Model: `AnimaConfig.tiny()` (DiT width 64, 2 blocks, adapter width 32, 2 layers). Base: "
        f"{preset['pretrain_steps']} steps on all classes (`configs/lab/pretrain.yaml`). Each fine-tune: "
        f"{preset['finetune_steps']} steps from the base, probed every {preset['probe_every']} steps. `deepspeed` "
        f"with {args.nproc} CPU ranks, ZeRO-2, fp32.",
        "- Recipes: `configs/lab/*.yaml`; the lab overrides only paths, seed, step counts and the pretraining source "
        "weights (each run's exact command is in `<run>/command.txt`). "
        f"Sampling: Euler, {preset['grid_steps']} steps, CFG {GUIDANCE:g} against the empty caption (the recipes "
        "drop 10% of captions).",
        f"- Mode: {'--quick (shortened; numbers are noisy)' if args.quick else 'default'}"
        f"{' + --full' if args.full else ''}. Every number below is read from the run's files (`ft_*/probe.jsonl`, "
        "`ft_*/metrics.jsonl`, `drift/drift_kinds.csv`, `grids/sample_accuracy.csv`); `lab_summary.json` holds them "
        "all.",
    ]


def train_base(args: argparse.Namespace, out: Path, preset: dict, shards: dict[str, Path], counts: dict) -> float | None:
    """The base model on all classes (source weights = their shares of the training images) -> base.safetensors."""
    config = args.configs / "pretrain.yaml"
    total = counts["target_train"] + counts["replay_train"]
    overrides = [*pipeline.source_overrides(config, shards), f"run.seed={args.seed}",
                 *pipeline.stage_overrides(config, preset["pretrain_steps"]),
                 f"data.sources.0.weight={counts['target_train'] / total}",
                 f"data.sources.1.weight={counts['replay_train'] / total}"]
    if args.quick:
        overrides.append("stages.0.warmup_steps=5")
    return pipeline.launch_training(config, out / "pretrain", overrides, args.nproc, {}, out / "base.safetensors",
                                    args.reuse_runs, preset["pretrain_steps"])


def from_base_overrides(args: argparse.Namespace, out: Path, preset: dict, shards: dict[str, Path],
                        config: Path, seed_offset: int = 0) -> list[str]:
    """Dotlist of a run that starts from the base model: shard paths, seeds, init path, probe interval, steps.

    ``seed_offset`` changes the training seed only; the probe (``eval.seed``) stays, so runs stay paired."""
    return pipeline.from_init_overrides(config, shards, args.seed + seed_offset, out / "base.safetensors",
                                        preset["probe_every"], args.seed, preset["finetune_steps"])


def run_redistribution(args: argparse.Namespace, out: Path, preset: dict, shards: dict[str, Path],
                       probe_sets: dict[str, Path], finals: dict[str, Path], timings: dict) -> Path:
    """The redistribution variant (:mod:`anima_ft.lab.redistribution`): ``launch/train.py`` with
    ``--distill-recipe`` from the base, export, then the measurements on the export; returns its markdown."""
    from anima_ft.lab import redistribution

    run_dir = out / f"ft_{redistribution.NAME}"
    export = out / f"{redistribution.NAME}.safetensors"
    # probed at the start (base DiT + re-initialized adapter) and the end only: the report has no curve
    overrides = [*from_base_overrides(args, out, preset, shards, args.distill_recipe),
                 f"eval.probe_every_steps={preset['finetune_steps']}"]
    seconds = pipeline.launch_training(args.distill_recipe, run_dir, overrides, args.nproc, probe_sets, export,
                                       args.reuse_runs, preset["finetune_steps"])
    timings["redistribution variant (deepspeed, with probe)"] = seconds
    t0 = time.perf_counter()
    logger.info("redistribution: measuring the export (teacher gaps of 5 pairings, flow probe)")
    references = {f"{name} fine-tune": path for name, path in finals.items() if name == "no_replay"}
    result = redistribution.measure(out, run_dir, export, probe_sets, references)
    timings["redistribution measurements"] = time.perf_counter() - t0
    return redistribution.write_markdown(result, run_dir, args.nproc, seconds)


def train_variants(args: argparse.Namespace, out: Path, preset: dict, shards: dict[str, Path], variants: list[str],
                   probe_sets: dict[str, Path], timings: dict) -> tuple[dict[str, Path], list[VariantResult], dict]:
    """Every fine-tune from the base, with the probe; returns ``(exports, results, failed {name: error})``.

    A failed variant is logged and reported; the others still run.
    """
    finals, results, failed = {}, [], {}
    for i, name in enumerate(variants):
        recipe, description, seed_offset = VARIANTS[name]
        config = args.configs / recipe
        export = out / f"{name}.safetensors"
        logger.info("fine-tune %d of %d: %s", i + 1, len(variants), name)
        try:
            seconds = pipeline.launch_training(
                config, out / f"ft_{name}", from_base_overrides(args, out, preset, shards, config, seed_offset),
                args.nproc, probe_sets, export, args.reuse_runs, preset["finetune_steps"])
        except RuntimeError as err:
            logger.error("variant %s failed: %s", name, err)
            failed[name] = str(err)
            continue
        timings[f"fine-tune {name} (deepspeed, with probe)"] = seconds
        finals[name] = export
        results.append(variant_from_probe(name, description, out / f"ft_{name}" / "probe.jsonl"))
        results[-1].train_seconds = seconds or 0.0
    return finals, results, failed


def compute_costs(out: Path, names: list[str], nproc: int) -> dict[str, dict]:
    """Per fine-tune: measured step time and the teacher forwards per step (:mod:`anima_ft.lab.compare`)."""
    costs = {}
    for name in names:
        shares = compare.batch_shares(out / f"ft_{name}" / "config.yaml", nproc)
        costs[name] = {**shares, "teacher_forwards": shares["distill"] * shares["global_batch"],
                       "step_s": compare.step_seconds(out / f"ft_{name}" / "metrics.jsonl", shares["global_batch"])}
    return costs


def run_cpu_seconds(out: Path, timings: dict) -> dict[str, float]:
    """``{timings key: cpu_s}`` of every training run that trained this time (its ``timing.json``)."""
    runs = {"base model (deepspeed)": "pretrain", "redistribution variant (deepspeed, with probe)": "ft_redistribute"}
    runs |= {k: "ft_" + k.split()[1] for k in timings if k.startswith("fine-tune ")}
    out_cpu = {}
    for key, run in runs.items():
        if timings.get(key) is not None:
            out_cpu[key] = json.loads((out / run / "timing.json").read_text())["cpu_s"]
    return out_cpu


def choose_variants(args: argparse.Namespace) -> list[str]:
    """``--variants`` or the mode's set; no_replay (the baseline) first."""
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:
        variants = list(VARIANTS) if args.full else list(DEFAULT_VARIANTS)
    if any(v not in VARIANTS for v in variants) or "no_replay" not in variants:
        raise ValueError(f"--variants {args.variants!r}: choose from {list(VARIANTS)}, including no_replay "
                         "(the baseline every other variant is compared with)")
    return ["no_replay", *[v for v in variants if v != "no_replay"]]


def main(argv: list[str]) -> int:
    """Run the whole lab and write ``<out>/report.md``; returns 0 on success, 1 if a variant failed."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the in-process export imports deepspeed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preset = dict(QUICK if args.quick else DEFAULT)
    preset["pretrain_steps"] = args.pretrain_steps or preset["pretrain_steps"]
    preset["finetune_steps"] = args.finetune_steps or preset["finetune_steps"]
    variants = choose_variants(args)
    cpu: dict[str, float] = {}
    target = tuple(int(c) for c in args.target_classes.split(","))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start, timings, cpu_start = time.perf_counter(), {}, pipeline.cpu_seconds()

    logger.info("phase prepare: digits -> codec -> shards")
    data_settings = {"seed": args.seed, "target_classes": list(target), "image_size": 32,
                     "probe_per_class": preset["probe_per_class"], "max_train_per_class": preset["max_train_per_class"],
                     "codec_normalize": preset["codec_normalize"]}
    data = pipeline.prepare_data(out / "data", data_settings)
    timings["prepare" + (" (reused shards)" if data["reused"] else "")] = data["seconds"]
    shards = {s: out / "data" / "shards" / s for s in pipeline.SPLITS}

    logger.info("phase base model: %d steps on all digits", preset["pretrain_steps"])
    timings["base model (deepspeed)"] = train_base(args, out, preset, shards, data["counts"])
    probe_sets = {HELD_OUT: shards["replay_probe"], TARGET: shards["target_probe"]}
    logger.info("phase fine-tunes: %s", ", ".join(variants))
    finals, results, failed = train_variants(args, out, preset, shards, variants, probe_sets, timings)
    if not results:
        raise RuntimeError(f"every fine-tune failed: {failed}")

    t0, c0 = time.perf_counter(), pipeline.cpu_seconds()
    logger.info("phase drift: %d checkpoints against the base", len(finals))
    drift = pipeline.run_drift(out / "base.safetensors", finals, out / "drift")
    for v in results:
        v.drift = drift[v.name]
    timings["drift"] = time.perf_counter() - t0
    cpu["drift"] = pipeline.cpu_seconds() - c0
    t0, c0 = time.perf_counter(), pipeline.cpu_seconds()
    logger.info("phase sample grids: %d checkpoints x 10 digits x %d samples", len(finals) + 1,
                preset["scored_per_class"])
    samples = pipeline.make_grids({"base": out / "base.safetensors", **finals}, out / "data", out / "grids",
                                  args.seed, target, preset["grid_per_class"], preset["scored_per_class"],
                                  preset["grid_steps"], GUIDANCE)
    timings["sample grids"] = time.perf_counter() - t0
    cpu["sample grids"] = pipeline.cpu_seconds() - c0
    redistribution = None
    if args.full and not args.no_distill:
        logger.info("phase redistribution variant (--full)")
        try:
            redistribution = run_redistribution(args, out, preset, shards, probe_sets, finals, timings)
        except RuntimeError as err:
            logger.error("the redistribution variant failed: %s", err)
            failed["redistribute"] = str(err)

    concepts_md = None
    if args.full and not args.no_concepts:
        logger.info("phase Question 2 (--full): where does a new concept's knowledge go?")
        from anima_ft.lab.concepts import run_question2

        try:
            concepts_md = run_question2(args, out, preset, timings, cpu, GUIDANCE)
        except RuntimeError as err:
            logger.error("Question 2 failed: %s", err)
            failed["question 2"] = str(err)

    by_name = {v.name: v for v in results}
    q1 = None
    if all(n in by_name for n in (*compare.Q1_VARIANTS, FLOOR)):
        costs = compute_costs(out, [*compare.Q1_VARIANTS, FLOOR], args.nproc)
        q1 = compare.comparison(by_name, FLOOR, HELD_OUT, TARGET, costs)
    timings["total"] = time.perf_counter() - t_start
    cpu.update(run_cpu_seconds(out, timings))
    cpu["total"] = pipeline.cpu_seconds() - cpu_start

    first_probe = read_probe_log(out / f"ft_{results[0].name}" / "probe.jsonl")[0]
    meta = {
        "seed": args.seed, "sigmas": first_probe["sigmas"], "num_noises": first_probe["num_noises"],
        "held_out": HELD_OUT, "target": TARGET, "baseline": "no_replay",
        "drift_groups": ["llm_adapter", "adapter_blocks", "adapter_embed", "dit", *pipeline.DIT_KINDS],
        "setup": setup_lines(args, preset, target, data["counts"]), "timings": timings, "cpu_seconds": cpu, "failed": failed,
        "grids": {k: str(Path(p).relative_to(out)) for k, p in samples["grids"].items()},
        "configs": {"base": "pretrain/config.yaml", **{v.name: f"ft_{v.name}/config.yaml" for v in results},
                    **({"redistribute": "ft_redistribute/config.yaml"} if redistribution else {})},
        "sample_accuracy": samples["accuracy"], "load_average": os.getloadavg(),
        "extra_sections": compare.markdown(q1, HELD_OUT, TARGET) if q1 else [],
    }
    summary = {"meta": meta, "settings": preset, "data": data, "q1": q1,
               "variants": {v.name: {"steps": v.steps, "curve": v.curve, "drift": v.drift} for v in results}}
    (out / "lab_summary.json").write_text(json.dumps(summary, indent=1))
    report = write_report(out, results, meta)
    if redistribution is not None:
        body = Path(redistribution).read_text().replace("\n# ", "\n## ").removeprefix("# ")
        with open(report, "a") as fh:
            fh.write(f"\n## {body}\n(From `{Path(redistribution).relative_to(out)}`.)\n")
    if concepts_md is not None:
        body = Path(concepts_md).read_text().replace("\n## ", "\n### ").removeprefix("# ")
        with open(report, "a") as fh:
            fh.write(f"\n## {body}\n(From `{Path(concepts_md).relative_to(out)}`.)\n")
    logger.info("wrote %s (%.0f s in all; load average now %.2f %.2f %.2f)", report, timings["total"],
                *os.getloadavg())
    print(f"report: {report}")
    return 1 if failed else 0
