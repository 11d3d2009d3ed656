"""The lab's steps: prepare the digit shards, launch ``deepspeed`` training runs, drift, scored sample grids.

Each function does one step of :mod:`anima_ft.lab.run` and writes its outputs under the lab directory::

    data/settings.json  data/codec.safetensors  data/images/<split>/  data/shards/<split>/*.tar
    <run>/ (trainer run dir: config.yaml, metrics.jsonl, probe.jsonl, train.log)   base.safetensors  <variant>.safetensors
    drift/ (anima-ft drift outputs + drift_kinds.csv)   grids/*.png + grids/sample_accuracy.csv
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from anima_ft.lab import text_stack
from anima_ft.lab.codec import PCAPatchCodec
from anima_ft.lab.digits import caption_vocabulary, load_digit_splits, pixels_from_images, write_image_folder
from anima_ft.runtime import free_port

logger = logging.getLogger(__name__)
SPLITS = ("target_train", "replay_train", "target_probe", "replay_probe")
TEXT_WIDTH = 32  # = AnimaConfig.tiny().adapter.source_dim
REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_DATA_VERSION = 1  # bump when digits / codec / text-stack code changes what the shards hold
DIT_KINDS = ("self_attn", "cross_attn", "mlp", "mod", "base")  # the DiT's LR groups (anima_ft.model.groups)


def build_text_encoder(seed: int):
    """The lab's tiny text stack as a ``TextEncoder`` (deterministic for ``seed``)."""
    return text_stack.build_text_encoder(caption_vocabulary(), hidden_size=TEXT_WIDTH, seed=seed)


def prepare_data(data_dir: Path, data_settings: dict) -> dict:
    """Images -> codec -> shards for the four splits; reuses them when ``settings.json`` holds the same settings
    and every shard's encoder fingerprint equals the saved codec's plus this text stack's.

    Returns ``{"counts": {split: n}, "reused": bool, "codec": fingerprint, "seconds": s}``.
    """
    from anima_ft.data.prepare import PrepareConfig, prepare_shards
    from anima_ft.data.shard_format import fingerprint_hash, make_fingerprint, read_index

    t0 = time.perf_counter()
    settings_path = data_dir / "settings.json"
    codec_path = data_dir / "codec.safetensors"
    data_settings = {**data_settings, "lab_data_version": LAB_DATA_VERSION}
    text = build_text_encoder(data_settings["seed"])
    done = settings_path.exists() and json.loads(settings_path.read_text()).get("settings") == data_settings
    if done and codec_path.exists() and all((data_dir / "shards" / s / "prepare_summary.json").exists() for s in SPLITS):
        want = fingerprint_hash(make_fingerprint(PCAPatchCodec.load(codec_path).fingerprint(), text.fingerprint()))
        found = {read_index(t)["fingerprint_hash"] for t in (data_dir / "shards").glob("*/*.tar")}
        if found == {want}:
            logger.info("reusing prepared shards in %s", data_dir)
            saved = json.loads(settings_path.read_text())
            return {**saved["result"], "reused": True, "seconds": time.perf_counter() - t0}
    if data_dir.exists():
        logger.info("data settings changed (or data incomplete): re-preparing %s", data_dir)
        shutil.rmtree(data_dir)
    splits = load_digit_splits(tuple(data_settings["target_classes"]), data_settings["probe_per_class"],
                               data_settings["image_size"], data_settings["seed"],
                               data_settings["max_train_per_class"])
    train_images = [s.image for name in ("target_train", "replay_train") for s in splits[name]]
    codec = PCAPatchCodec.fit(torch.from_numpy(pixels_from_images(train_images)))
    data_dir.mkdir(parents=True, exist_ok=True)
    codec.save(codec_path)
    counts = {}
    for name in SPLITS:
        folder = write_image_folder(splits[name], data_dir / "images" / name)
        cfg = PrepareConfig(out_dir=str(data_dir / "shards" / name), bucket_area=data_settings["image_size"] ** 2,
                            shard_size=4096, batch_size=64, source_name=name.split("_")[0], progress=False)
        summary = prepare_shards([str(folder)], codec, text, cfg)
        if summary["samples"] != len(splits[name]):
            raise RuntimeError(f"prepare wrote {summary['samples']} of {len(splits[name])} {name} samples "
                               f"(skipped: {summary['counts']}); see {cfg.out_dir}/prepare_summary.json")
        counts[name] = summary["samples"]
    result = {"counts": counts, "codec": codec.fingerprint()}
    settings_path.write_text(json.dumps({"settings": data_settings, "result": result}, indent=1))
    return {**result, "reused": False, "seconds": time.perf_counter() - t0}


def launch_training(config: Path, run_dir: Path, overrides: list[str], nproc: int, probe_sets: dict[str, Path],
                    export_path: Path, reuse: bool = False) -> float | None:
    """``deepspeed --num_gpus nproc launch/train.py --config CONFIG ...`` into a fresh ``run_dir``, then
    ``anima-ft export`` of its last checkpoint to ``export_path``; returns seconds.

    ``probe_sets`` become the trainer's probe sets (``eval.sets``): the trainer probes them at step 0 and every
    ``eval.probe_every_steps`` steps and writes every image's losses to ``run_dir/probe.jsonl``.
    ``reuse=True`` skips the run (returns None) when ``run_dir/done.json`` records the same command and recipe text.

    The launcher's output goes to ``run_dir/train.log``; a failed run raises RuntimeError with the log's tail.
    """
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    args = [str(REPO_ROOT / "launch" / "train.py"), "--config", str(config)]
    if probe_sets:
        sets = ", ".join(f"{{name: {name}, path: '{path}'}}" for name, path in probe_sets.items())
        args.append(f"eval.sets=[{sets}]")
    args += [f"run.dir={run_dir}", "checkpoint.resume=none", *overrides]
    record = json.dumps({"nproc": nproc, "args": args, "config_text": Path(config).read_text()}, indent=1)
    done = run_dir / "done.json"
    if reuse and done.exists() and done.read_text() == record and export_path.exists():
        logger.info("reusing finished run %s (same command and recipe)", run_dir)
        return None
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    logger.info("training %s (%d ranks), log: %s", run_dir.name, nproc, run_dir / "train.log")
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT).returncode
    if rc != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training run {run_dir} failed (exit {rc}); last lines of train.log:\n{tail}")
    from anima_ft.train import export

    if export.main([str(run_dir), str(export_path)]) != 0:  # `anima-ft export RUN OUT`: the last checkpoint
        raise RuntimeError(f"anima-ft export {run_dir} {export_path} failed")
    done.write_text(record)
    return time.perf_counter() - t0


def run_drift(base: Path, finals: dict[str, Path], out_dir: Path) -> dict[str, dict[str, float]]:
    """``anima-ft drift`` (tables, CSVs, heatmap) plus ``drift_kinds.csv``: per variant, the relative change against
    the base model of the whole adapter (``llm_adapter``), its blocks + output norm/projection (``adapter_blocks``),
    its T5 embedding table (``adapter_embed``), the whole DiT (``dit``) and each DiT kind."""
    from anima_ft.eval import drift

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(base), *map(str, finals.values())]
    drift.main([*paths, "--labels", ",".join(["base", *finals]), "--out-dir", str(out_dir)])
    result: dict[str, dict[str, float]] = {}
    for name, path in finals.items():
        groups = drift.compare_files(base, path).groups
        kinds = drift.kind_table(groups)
        dit, blocks = drift.DriftStats(), drift.DriftStats()
        for k in DIT_KINDS:
            if k in kinds:
                dit += kinds[k]
        for g, st in groups.items():
            if g.startswith("llm_adapter.") and g != "llm_adapter.embed":
                blocks += st
        result[name] = {"llm_adapter": kinds["llm_adapter"].rel, "adapter_blocks": blocks.rel,
                        "adapter_embed": groups["llm_adapter.embed"].rel, "dit": dit.rel,
                        **{k: kinds[k].rel for k in DIT_KINDS if k in kinds}}
    with open(out_dir / "drift_kinds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "kind", "rel_change"])
        for name, row in result.items():
            for kind, rel in row.items():
                w.writerow([name, kind, repr(rel)])
    return result


def read_drift_kinds(path: Path) -> dict[str, dict[str, float]]:
    """Parse ``drift_kinds.csv`` back into ``{variant: {kind: rel}}``."""
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["variant"], {})[row["kind"]] = float(row["rel_change"])
    return out


def _png_batch(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(pixels_from_images([Image.open(p) for p in paths]))


def _label(path: Path) -> int:
    return int(path.name[len("digit")])  # keys are digit<label>_<index>


def make_grids(checkpoints: dict[str, Path], data_dir: Path, out_dir: Path, seed: int, target: tuple[int, ...],
               per_class: int, scored_per_class: int, num_steps: int, guidance: float) -> dict:
    """Sample ``scored_per_class`` images per digit from every checkpoint, score them with the digit classifier,
    and save grids of the first ``per_class`` (plus the codec round trip of real probe images).

    Writes ``out_dir/sample_accuracy.csv`` (checkpoint, prompts, accuracy, num_samples) and returns
    ``{"grids": {title: png path}, "accuracy": {checkpoint: {"target": acc, "replay": acc, "n_target": n,
    "n_replay": n}}}``; the checkpoint
    ``real probe images`` is the classifier's accuracy on held-out real images after the codec round trip.
    """
    from anima_ft.lab.classify import DigitClassifier
    from anima_ft.lab.digits import caption_for
    from anima_ft.lab.grids import sample_digits, save_grid
    from anima_ft.model import load_anima

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))  # nothing else runs now: use every core
    codec = PCAPatchCodec.load(data_dir / "codec.safetensors")
    text = build_text_encoder(seed)
    train = sorted((data_dir / "images").glob("*_train/*.png"))
    classifier = DigitClassifier(_png_batch(train), [_label(p) for p in train])
    labels = list(range(10))
    groups = {"target": [c for c in labels if c in target], "replay": [c for c in labels if c not in target]}

    def score(images_10_n: torch.Tensor) -> dict[str, float]:
        n = images_10_n.shape[1]
        pred = classifier.predict(images_10_n.flatten(0, 1)).reshape(10, n)
        out = {g: float(np.mean([pred[c] == c for c in cs])) for g, cs in groups.items()}
        return {**out, **{f"n_{g}": n * len(cs) for g, cs in groups.items()}}

    grids, accuracy = {}, {}
    probe = sorted((data_dir / "images").glob("*_probe/*.png"))
    by_class = [[p for p in probe if _label(p) == c] for c in labels]
    n_real = min(len(row) for row in by_class)
    real = codec.decode(codec.encode(_png_batch([p for row in by_class for p in row[:n_real]]))).clamp(-1, 1)
    real = real.view(10, n_real, *real.shape[1:])
    accuracy["real probe images"] = score(real)
    grids["real probe images (codec round trip)"] = str(save_grid(real[:, :per_class], out_dir / "real.png",
                                                                  [str(c) for c in labels]))
    captions = [caption_for(c, 0) for c in labels]
    for name, path in checkpoints.items():
        model = load_anima(str(path), dtype=torch.float32)
        images = sample_digits(model, text, codec, captions, scored_per_class, real.shape[-1] // codec.patch,
                               seed=seed, num_steps=num_steps, guidance_scale=guidance)
        accuracy[name] = score(images)
        grids[f"{name}: samples for 'a handwritten digit <row>'"] = str(
            save_grid(images[:, :per_class], out_dir / f"{name}.png", [str(c) for c in labels]))
    with open(out_dir / "sample_accuracy.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "prompts", "accuracy", "num_samples"])
        for name, acc in accuracy.items():
            for g in groups:
                w.writerow([name, g, repr(acc[g]), acc[f"n_{g}"]])
    return {"grids": grids, "accuracy": accuracy}
