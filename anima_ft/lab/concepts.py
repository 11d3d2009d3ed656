"""``anima-ft lab --full``, Question 2: where does a new concept's knowledge go? (docs/lab.md#question-2)

Anima was built from a pretrained DiT to which the LLM adapter was added and trained jointly with it on new concepts
(artist tags). The lab rebuilds that history in miniature, every run through ``launch/train.py``:

1. data (``q2/data``): the digits plain and in four named styles (:mod:`anima_ft.lab.styles`); a codec fitted on
   both, and the text stack over the caption words plus the style names;
2. ``dit_first``: the DiT pretrained on the plain digits with the adapter frozen at its random init
   (``configs/lab/q2_dit_first.yaml``);
3. from it, the named styles learned three ways: ``joint`` (adapter and DiT together, as Anima was built),
   ``joint_seed1`` (the same with the next training seed: the noise floor), ``adapter_frozen_first`` (the DiT alone
   for the first half);
4. ``redistribute``: the joint run's DiT with the base's adapter, distilled from the joint run
   (``configs/lab/q2_redistribute.yaml``);
5. the adapter-swap attribution of every model against the base (:mod:`anima_ft.lab.concept_share`) and samples
   scored by a style classifier; ``q2/concepts.md`` + ``q2/concepts.json`` (:mod:`anima_ft.lab.concept_report`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from anima_ft.lab import concept_report, concept_share, pipeline, styles

logger = logging.getLogger(__name__)
BASE = "dit_first"
RUNS = {  # name: (recipe, training-seed offset)
    "joint": ("q2_concepts_joint.yaml", 0),
    "joint_seed1": ("q2_concepts_joint.yaml", 1),
    "adapter_frozen_first": ("q2_concepts_adapter_frozen_first.yaml", 0),
}
REDISTRIBUTED = "redistributed"
FLOOR = ("joint", "joint_seed1")
SOURCES = {"plain": "plain_train", "styled": "styled_train"}  # recipe source name -> split
START = "joint_dit_with_base_adapter.safetensors"  # the redistribution student's init file
SAMPLED = {  # label: (DiT of, adapter of)
    "DiT-first base": (BASE, BASE),
    "joint": ("joint", "joint"),
    "joint DiT + base adapter": ("joint", BASE),
    "base DiT + joint adapter": (BASE, "joint"),
    "adapter frozen first": ("adapter_frozen_first", "adapter_frozen_first"),
    "redistributed": (REDISTRIBUTED, REDISTRIBUTED),
}


def _splits(settings: dict) -> dict:
    return styles.load_style_splits(settings["probe_per_class"], settings["image_size"], settings["seed"],
                                    settings["max_train_per_class"])


def train_runs(args, q2: Path, preset: dict, shards: dict[str, Path], timings: dict,
               run_dirs: dict[str, Path]) -> dict[str, Path]:
    """The DiT-first base, the three concept runs and the redistribution; returns ``{name: export}`` and fills
    ``run_dirs`` with ``{timings key: run dir}``."""
    from anima_ft.eval.swap import compose

    exports = {BASE: q2 / f"{BASE}.safetensors"}
    config = args.configs / "q2_dit_first.yaml"
    over = [*pipeline.source_overrides(config, shards, SOURCES), f"run.seed={args.seed}",
            *pipeline.stage_overrides(config, preset["q2_pretrain_steps"])]
    if args.quick:
        over.append("stages.0.warmup_steps=5")
    logger.info("Q2: the DiT-first base, %d steps on plain digits, adapter frozen", preset["q2_pretrain_steps"])
    run_dirs["Q2 DiT-first base (deepspeed)"] = q2 / BASE
    timings["Q2 DiT-first base (deepspeed)"] = pipeline.launch_training(
        config, q2 / BASE, over, args.nproc, {}, exports[BASE], args.reuse_runs, preset["q2_pretrain_steps"])
    steps = preset["finetune_steps"]
    probe = {"styled": shards["styled_probe"]}  # in training: probed at the first and the last step

    def from_base(config: Path, seed_offset: int, init: Path) -> list[str]:
        return pipeline.from_init_overrides(config, shards, args.seed + seed_offset, init, steps, args.seed, steps,
                                            SOURCES)

    for i, (name, (recipe, offset)) in enumerate(RUNS.items()):
        logger.info("Q2: concept run %d of %d: %s", i + 1, len(RUNS), name)
        exports[name] = q2 / f"{name}.safetensors"
        config = args.configs / recipe
        run_dirs[f"Q2 {name} (deepspeed, with probe)"] = q2 / f"ft_{name}"
        timings[f"Q2 {name} (deepspeed, with probe)"] = pipeline.launch_training(
            config, q2 / f"ft_{name}", from_base(config, offset, exports[BASE]), args.nproc, probe, exports[name],
            args.reuse_runs, steps)
    start = compose(exports["joint"], exports[BASE], q2 / START)
    config = args.configs / "q2_redistribute.yaml"
    exports[REDISTRIBUTED] = q2 / f"{REDISTRIBUTED}.safetensors"
    logger.info("Q2: redistribution (joint DiT + base adapter, distilled from the joint run)")
    run_dirs[f"Q2 {REDISTRIBUTED} (deepspeed, with probe)"] = q2 / f"ft_{REDISTRIBUTED}"
    timings[f"Q2 {REDISTRIBUTED} (deepspeed, with probe)"] = pipeline.launch_training(
        config, q2 / f"ft_{REDISTRIBUTED}", [*from_base(config, 0, start), f"distill.teacher_path={exports['joint']}"],
        args.nproc, probe, exports[REDISTRIBUTED], args.reuse_runs, steps)
    return exports


def probe_all(exports: dict[str, Path], shards: dict[str, Path], eval_cfg) -> dict:
    """Per-image probe losses of every (DiT, adapter) pair the summary needs (module docstring of
    :mod:`anima_ft.lab.concept_share`). The redistributed student keeps the base's adapter bitwise (LR 0), so its
    two swaps equal probed pairs and are filled from them (``filled``)."""
    from anima_ft.eval.eval_sets import load_shard_eval_set

    probes = {s: load_shard_eval_set(shards[f"{s}_probe"], s) for s in concept_share.SETS}
    keys = {s: [x.key for x in probes[s]] for s in probes}
    if keys["styled"] != keys["untagged"]:
        raise RuntimeError("the styled and untagged probe sets must hold the same images in the same order")
    pairs = [(BASE, BASE)] + [p for m in RUNS for p in ((BASE, m), (m, BASE), (m, m))]
    pairs.append((REDISTRIBUTED, REDISTRIBUTED))
    identical = concept_share.same_adapter(exports[BASE], exports[REDISTRIBUTED])
    if not identical:
        pairs += [(BASE, REDISTRIBUTED), (REDISTRIBUTED, BASE)]
    losses = concept_share.probe_pairs(exports, pairs, probes, list(eval_cfg.sigmas), eval_cfg.num_noises,
                                       eval_cfg.seed, log=lambda m: logger.info("Q2 attribution: %s", m))
    filled = {}
    if identical:
        key = concept_share.pair_key
        filled = {key(BASE, REDISTRIBUTED): key(BASE, BASE), key(REDISTRIBUTED, BASE): key(REDISTRIBUTED, REDISTRIBUTED)}
        for dst, src in filled.items():
            losses[dst] = losses[src]
    return {"losses": losses, "filled": filled, "adapter_identical": identical, "keys": keys["styled"],
            "sigmas": list(eval_cfg.sigmas), "num_noises": eval_cfg.num_noises, "seed": eval_cfg.seed}


def score_samples(exports: dict[str, Path], data_dir: Path, out_dir: Path, seed: int, per_prompt: int,
                  num_steps: int, guidance: float) -> dict:
    """Samples for ``"a handwritten digit <word>"`` and ``"... by <style>"`` (10 digits x (1 + 4 styles) x
    ``per_prompt``) from every pair of :data:`SAMPLED`, read by a :class:`anima_ft.lab.classify.StyleClassifier`
    fitted on the training images: the style and the digit of the styled prompts' samples, the digit of the plain
    prompts' samples. Grids (rows: plain + styles, columns: digits) in ``out_dir``; ``samples.csv`` holds every
    number."""
    from anima_ft.eval.swap import load_combination
    from anima_ft.lab.classify import StyleClassifier
    from anima_ft.lab.codec import PCAPatchCodec
    from anima_ft.lab.digits import caption_for
    from anima_ft.lab.grids import sample_digits, save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    index = {None: 0, **{s: i + 1 for i, s in enumerate(styles.STYLE_NAMES)}}

    def labelled(folder: str):
        paths = sorted((data_dir / "images" / folder).rglob("*.png"))
        return (pipeline.png_batch(paths), [index[styles.style_of(p.stem)] for p in paths],
                [pipeline.digit_label(p) for p in paths])

    train = [labelled(f) for f in ("plain_train", "styled_train")]
    classifier = StyleClassifier(torch.cat([t[0] for t in train]), train[0][1] + train[1][1], train[0][2] + train[1][2])
    codec = PCAPatchCodec.load(data_dir / "codec.safetensors")
    text = pipeline.build_text_encoder(seed, styles.style_vocabulary())
    n_styles = len(styles.STYLES)
    # rows 0..9: the plain captions, then 10 per style; every row is sampled from the same noises
    want_style = np.repeat(np.arange(n_styles + 1), 10 * per_prompt)
    want_digit = np.tile(np.repeat(np.arange(10), per_prompt), n_styles + 1)
    styled = want_style > 0
    real, real_style, real_digit = labelled("styled_probe")
    real = codec.decode(codec.encode(real)).clamp(-1, 1)
    captions = [caption_for(c, 0) for c in range(10)]
    captions += [styles.tagged(caption_for(c, 0), s) for s in styles.STYLE_NAMES for c in range(10)]
    result = {}
    got_style, got_digit = classifier.predict(real)
    result["real held-out styled images (codec round trip)"] = {
        "style": float(np.mean(got_style == np.asarray(real_style))),
        "digit": float(np.mean(got_digit == np.asarray(real_digit))), "n": len(real_style),
        "plain_digit": None, "n_plain": 0}
    grids = {}
    for i, (label, (d, a)) in enumerate(SAMPLED.items()):
        logger.info("Q2 samples: %s (%d of %d)", label, i + 1, len(SAMPLED))
        model = load_combination(exports[d], exports[a], dtype=torch.float32)
        images = sample_digits(model, text, codec, captions, per_prompt, real.shape[-1] // codec.patch, seed=seed,
                               num_steps=num_steps, guidance_scale=guidance)  # [50, n, 3, H, W]
        got_style, got_digit = classifier.predict(images.flatten(0, 1))
        result[label] = {"style": float(np.mean(got_style[styled] == want_style[styled])),
                         "digit": float(np.mean(got_digit[styled] == want_digit[styled])), "n": int(styled.sum()),
                         "plain_digit": float(np.mean(got_digit[~styled] == want_digit[~styled])),
                         "n_plain": int((~styled).sum())}
        path = out_dir / f"{label.replace(' ', '_').replace('+', 'with')}.png"
        grids[label] = str(save_grid(images[:, 0].reshape(n_styles + 1, 10, *images.shape[2:]), path,
                                     ["plain", *styles.STYLE_NAMES], label_width=56))
    with open(out_dir / "samples.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "style_accuracy", "digit_accuracy", "num_samples", "plain_digit_accuracy",
                    "num_plain_samples"])
        for label, r in result.items():
            w.writerow([label, repr(r["style"]), repr(r["digit"]), r["n"], repr(r["plain_digit"]), r["n_plain"]])
    return {"accuracy": result, "grids": grids}


def run_question2(args, out: Path, preset: dict, timings: dict, cpu: dict, guidance: float) -> Path:
    """Every step of the module docstring; returns the path of ``q2/concepts.md``."""
    from anima_ft.config import load_config

    q2 = out / "q2"
    settings = {"seed": args.seed, "image_size": 32, "probe_per_class": preset["probe_per_class"],
                "max_train_per_class": preset["max_train_per_class"], "codec_normalize": preset["codec_normalize"],
                "question": 2, "probe_key_folder": "probe"}
    logger.info("Q2: prepare plain and styled digits")
    data = pipeline.prepare_data(q2 / "data", settings, styles.SPLITS, _splits, styles.style_vocabulary(),
                                 key_folders={"styled_probe": "probe", "untagged_probe": "probe"})
    timings["Q2 prepare" + (" (reused shards)" if data["reused"] else "")] = data["seconds"]
    shards = {s: q2 / "data" / "shards" / s for s in styles.SPLITS}
    run_dirs: dict[str, Path] = {}
    exports = train_runs(args, q2, preset, shards, timings, run_dirs)
    for key, run in run_dirs.items():
        if timings.get(key) is not None:  # None: a reused run
            cpu[key] = json.loads((run / "timing.json").read_text())["cpu_s"]
    t0 = time.perf_counter()
    eval_cfg = load_config(q2 / "ft_joint" / "config.yaml").eval
    probed = probe_all(exports, shards, eval_cfg)
    summary = concept_share.summarize(probed["losses"], BASE, [*RUNS, REDISTRIBUTED], FLOOR, REDISTRIBUTED,
                                      seed=args.seed)
    timings["Q2 attribution (adapter swaps)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = score_samples(exports, q2 / "data", q2 / "grids", args.seed, max(2, preset["scored_per_class"] // 2),
                            preset["grid_steps"], guidance)
    timings["Q2 samples"] = time.perf_counter() - t0
    result = {"probe": probed, "summary": summary, "samples": samples, "counts": data["counts"],
              "settings": {**settings, "pretrain_steps": preset["q2_pretrain_steps"],
                           "finetune_steps": preset["finetune_steps"]},
              "configs": {BASE: f"{BASE}/config.yaml", **{m: f"ft_{m}/config.yaml" for m in [*RUNS, REDISTRIBUTED]}}}
    (q2 / "concepts.json").write_text(json.dumps(result, indent=1))
    return concept_report.write_markdown(result, q2)
