"""The lab's steps: prepare the digit shards, train (``launch/train.py`` on local ranks), drift, scored sample grids.

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
import resource
import shlex
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
from anima_ft.lab.local_ranks import LocalRanks, command_lines

logger = logging.getLogger(__name__)
SPLITS = ("target_train", "replay_train", "target_probe", "replay_probe")
TEXT_WIDTH = 32  # = AnimaConfig.tiny().adapter.source_dim
REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_DATA_VERSION = 1  # bump when digits / codec / text-stack code changes what the shards hold
PROGRESS_EVERY_S = 10.0  # a training run logs its step and ETA at least this often
DIT_KINDS = ("self_attn", "cross_attn", "mlp", "mod", "base")  # the DiT's LR groups (anima_ft.model.groups)


def build_text_encoder(seed: int, words: list[str] | None = None):
    """The lab's tiny text stack as a ``TextEncoder`` over ``words`` (default: the plain caption vocabulary;
    deterministic for ``seed``)."""
    return text_stack.build_text_encoder(words or caption_vocabulary(), hidden_size=TEXT_WIDTH, seed=seed)


def default_splits(data_settings: dict) -> dict:
    """The default lab's four splits (:data:`SPLITS`) for ``data_settings``."""
    return load_digit_splits(tuple(data_settings["target_classes"]), data_settings["probe_per_class"],
                             data_settings["image_size"], data_settings["seed"], data_settings["max_train_per_class"])


def prepare_data(data_dir: Path, data_settings: dict, splits: tuple[str, ...] = SPLITS,
                 make_splits=default_splits, words: list[str] | None = None,
                 key_folders: dict[str, str] | None = None) -> dict:
    """Images -> codec -> shards for the ``splits`` that ``make_splits(data_settings)`` returns (the codec is fitted
    on the ``*_train`` splits; the text stack covers ``words``); reuses them when ``settings.json`` holds the same
    settings and every shard's encoder fingerprint equals the saved codec's plus this text stack's.

    Sample keys in the shards are ``<image folder name>-<unit>_<index>`` (``anima-ft prepare``); a split named in
    ``key_folders`` writes its images to ``images/<split>/<key_folders[split]>``, so two splits given the same
    folder name and the same file names get the same keys, and the probe draws the same noises for them.

    Returns ``{"counts": {split: n}, "reused": bool, "codec": fingerprint, "seconds": s}``.
    """
    from anima_ft.data.prepare import PrepareConfig, prepare_shards
    from anima_ft.data.shard_format import fingerprint_hash, make_fingerprint, read_index

    t0 = time.perf_counter()
    settings_path = data_dir / "settings.json"
    codec_path = data_dir / "codec.safetensors"
    data_settings = {**data_settings, "lab_data_version": LAB_DATA_VERSION}
    text = build_text_encoder(data_settings["seed"], words)
    done = settings_path.exists() and json.loads(settings_path.read_text()).get("settings") == data_settings
    if done and codec_path.exists() and all((data_dir / "shards" / s / "prepare_summary.json").exists() for s in splits):
        want = fingerprint_hash(make_fingerprint(PCAPatchCodec.load(codec_path).fingerprint(), text.fingerprint()))
        found = {read_index(t)["fingerprint_hash"] for t in (data_dir / "shards").glob("*/*.tar")}
        if found == {want}:
            logger.info("reusing prepared shards in %s", data_dir)
            saved = json.loads(settings_path.read_text())
            return {**saved["result"], "reused": True, "seconds": time.perf_counter() - t0}
    if data_dir.exists():
        logger.info("data settings changed (or data incomplete): re-preparing %s", data_dir)
        shutil.rmtree(data_dir)
    samples = make_splits(data_settings)
    train_images = [s.image for name in splits if name.endswith("_train") for s in samples[name]]
    codec = PCAPatchCodec.fit(torch.from_numpy(pixels_from_images(train_images)),
                              normalize=data_settings.get("codec_normalize", "channel"))
    data_dir.mkdir(parents=True, exist_ok=True)
    codec.save(codec_path)
    counts = {}
    for name in splits:
        folder = data_dir / "images" / name / (key_folders or {}).get(name, "")
        write_image_folder(samples[name], folder)
        cfg = PrepareConfig(out_dir=str(data_dir / "shards" / name), bucket_area=data_settings["image_size"] ** 2,
                            shard_size=4096, batch_size=64, source_name=name.split("_")[0], progress=False)
        summary = prepare_shards([str(folder)], codec, text, cfg)
        if summary["samples"] != len(samples[name]):
            raise RuntimeError(f"prepare wrote {summary['samples']} of {len(samples[name])} {name} samples "
                               f"(skipped: {summary['counts']}); see {cfg.out_dir}/prepare_summary.json")
        counts[name] = summary["samples"]
    result = {"counts": counts, "codec": codec.fingerprint()}
    settings_path.write_text(json.dumps({"settings": data_settings, "result": result}, indent=1))
    return {**result, "reused": False, "seconds": time.perf_counter() - t0}


def stage_overrides(config: Path, total: int) -> list[str]:
    """Dotlist setting the recipe's stage lengths to sum to ``total`` (stages split evenly, the last takes the rest)."""
    from anima_ft.config import load_config

    n = len(load_config(config).stages)
    if n == 0:
        return [f"num_steps={total}"]
    each = total // n
    out = [f"stages.{i}.num_steps={each}" for i in range(n - 1)]
    return out + [f"stages.{n - 1}.num_steps={total - each * (n - 1)}"]


SOURCE_SHARDS = {"target": "target_train", "replay": "replay_train", "preserve": "replay_train"}
"""The default lab's split per recipe data-source name."""


def source_overrides(config: Path, shards: dict[str, Path], names: dict[str, str] = SOURCE_SHARDS) -> list[str]:
    """Dotlist pointing each data source of the recipe at its lab shards (``names``: source name -> split)."""
    from anima_ft.config import load_config

    out = []
    for i, src in enumerate(load_config(config).data.sources):
        if src.name not in names:
            raise ValueError(f"{config}: data.sources.{i}.name={src.name!r}; the lab has shards for "
                             f"{sorted(names)}")
        out.append(f"data.sources.{i}.shards=[{shards[names[src.name]]}]")
    return out


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its waited-for children (the training ranks)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def last_logged_step(metrics_path: Path) -> int:
    """The largest ``step`` of a training row in a growing ``metrics.jsonl`` (0 if none yet; a torn last line is
    skipped, the writer is still appending it)."""
    if not metrics_path.is_file():
        return 0
    step = 0
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            step = max(step, int(row["step"]))
    return step


def progress_line(name: str, step: int, num_steps: int, elapsed: float, first: tuple[float, int] | None) -> str:
    """``"ft_x: step 40/150 (27%), 5.1 steps/s, ETA 22 s (38 s so far)"``; the rate is measured from the first logged
    step ``first = (time, step)`` so the ranks' start-up is not counted in it."""
    if step == 0 or num_steps <= 0 or first is None:
        return f"{name}: starting {'' if num_steps <= 0 else f'{num_steps} steps '}({elapsed:.0f} s so far)"
    t_first, s_first = first
    if step > s_first:
        rate = (step - s_first) / max(elapsed - t_first, 1e-9)
        speed = f"{rate:.1f} steps/s, ETA {(num_steps - step) / rate:.0f} s"
    else:
        speed = "ETA after the next logged step"
    return f"{name}: step {step}/{num_steps} ({100 * step / num_steps:.0f}%), {speed} ({elapsed:.0f} s so far)"


def wait_with_progress(proc: subprocess.Popen | LocalRanks, run_dir: Path, num_steps: int, t0: float) -> int:
    """Wait for the run's processes; log :func:`progress_line` every ``PROGRESS_EVERY_S`` s and a closing line; returns its
    exit code."""
    first, last_print = None, time.perf_counter()
    while True:
        try:
            rc = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        else:  # the closing line, also for a run shorter than one progress interval
            logger.info("%s: finished with exit code %d at step %d/%d (%.0f s)", run_dir.name, rc,
                        last_logged_step(run_dir / "metrics.jsonl"), num_steps, time.perf_counter() - t0)
            return rc
        now = time.perf_counter()
        if now - last_print >= PROGRESS_EVERY_S:
            step = last_logged_step(run_dir / "metrics.jsonl")
            if step and first is None:
                first = (now - t0, step)
            logger.info(progress_line(run_dir.name, step, num_steps, now - t0, first))
            last_print = now


def from_init_overrides(config: Path, shards: dict[str, Path], seed: int, init: Path, probe_every: int,
                        eval_seed: int, steps: int, names: dict[str, str] = SOURCE_SHARDS) -> list[str]:
    """Dotlist of a run that starts from the checkpoint ``init``: shard paths, training seed, init path, probe
    interval and seed (kept apart from the training seed, so runs of other seeds stay paired), stage lengths."""
    return [*source_overrides(config, shards, names), f"run.seed={seed}", f"model.init_path={init}",
            f"eval.probe_every_steps={probe_every}", f"eval.seed={eval_seed}", *stage_overrides(config, steps)]


def input_fingerprints(args: list[str]) -> dict[str, str]:
    """``{path: fingerprint}`` of every ``key=value`` argument whose value (or list item) is an existing path: a
    file's sha256, a directory's listing (name, size, mtime). A reused run must have read the same inputs: the same
    init checkpoint, teacher and shards."""
    import hashlib
    import re

    out = {}
    for arg in args:
        value = arg.split("=", 1)[1] if "=" in arg else ""
        for token in re.split(r"[\s\[\]{},'\"]+", value):  # list items and {name: x, path: y} records
            path = Path(token)
            if "/" not in token or not path.exists():
                continue
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = json.dumps(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                   for f in path.iterdir() if f.is_file()))
    return out


def launch_training(config: Path, run_dir: Path, overrides: list[str], nproc: int, probe_sets: dict[str, Path],
                    export_path: Path, reuse: bool = False, num_steps: int = 0) -> float | None:
    """``launch/train.py --config CONFIG ...`` on ``nproc`` local ranks (:class:`~anima_ft.lab.local_ranks.LocalRanks`:
    the environment contract of ``torchrun``/``srun``, without the ``deepspeed`` launcher's two extra processes) into
    a fresh ``run_dir``, then ``anima-ft export`` of its last checkpoint to ``export_path``; returns seconds (wall
    clock), and writes ``run_dir/timing.json`` (``wall_s`` and ``cpu_s``: the CPU seconds of the ranks and the export).
    ``run_dir/command.txt`` holds the rank commands and the equivalent ``deepspeed`` command.

    ``probe_sets`` become the trainer's probe sets (``eval.sets``): the trainer probes them at step 0 and every
    ``eval.probe_every_steps`` steps and writes every image's losses to ``run_dir/probe.jsonl``.
    ``reuse=True`` skips the run (returns None) when ``run_dir/done.json`` records the same command, recipe text and
    input files (:func:`input_fingerprints`).

    The launcher's output goes to ``run_dir/train.log``; a failed run raises RuntimeError with the log's tail.
    While it trains, a progress line (step of ``num_steps``, steps/s, ETA; read from ``metrics.jsonl``) is logged at
    least every ``PROGRESS_EVERY_S`` seconds.
    """
    args = [str(REPO_ROOT / "launch" / "train.py"), "--config", str(config)]
    if probe_sets:
        sets = ", ".join(f"{{name: {name}, path: '{path}'}}" for name, path in probe_sets.items())
        args.append(f"eval.sets=[{sets}]")
    args += [f"run.dir={run_dir}", "checkpoint.resume=none", *overrides]
    record = json.dumps({"nproc": nproc, "args": args, "config_text": Path(config).read_text(),
                         "inputs": input_fingerprints(args)}, indent=1)
    done = run_dir / "done.json"
    if reuse and done.exists() and done.read_text() == record and export_path.exists():
        logger.info("reusing finished run %s (same command and recipe)", run_dir)
        return None
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    argv = [sys.executable, "-u", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    logger.info("training %s (%d ranks), log: %s", run_dir.name, nproc, run_dir / "train.log")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    with open(run_dir / "train.log", "w") as log:
        ranks = LocalRanks(argv, nproc, env, log, REPO_ROOT)
        (run_dir / "command.txt").write_text(
            f"# {nproc} ranks of launch/train.py on this machine, as the lab started them:\n"
            + command_lines(argv, nproc, ranks.port)
            + "# the same run through the deepspeed launcher:\n"
            + shlex.join(["deepspeed", "--num_gpus", str(nproc), *args]) + "\n")
        try:
            rc = wait_with_progress(ranks, run_dir, num_steps, t0)
        except BaseException:  # Ctrl-C or an error here: no rank outlives the lab
            ranks.terminate()
            raise
    if rc != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training run {run_dir} failed (exit {rc}); last lines of train.log:\n{tail}")
    from anima_ft.train import export

    if export.main([str(run_dir), str(export_path)]) != 0:  # `anima-ft export RUN OUT`: the last checkpoint
        raise RuntimeError(f"anima-ft export {run_dir} {export_path} failed")
    seconds = time.perf_counter() - t0
    (run_dir / "timing.json").write_text(json.dumps({"wall_s": seconds, "cpu_s": cpu_seconds() - cpu0}))
    done.write_text(record)
    return seconds


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


def png_batch(paths: list[Path]) -> torch.Tensor:
    """PNG files -> float32 ``[B, 3, H, W]`` in ``[-1, 1]``."""
    from PIL import Image

    return torch.from_numpy(pixels_from_images([Image.open(p) for p in paths]))


def digit_label(path: Path) -> int:
    """The digit class of a lab image file (keys are ``digit<label>_<index>[_<style>]``)."""
    return int(path.name[len("digit")])


class SampleScorer:
    """The lab's sample scoring: the digit classifier (fitted on the training images), the codec, the text stack,
    the ten captions ("a handwritten digit <word>") and the prompt groups (target / replay classes)."""

    def __init__(self, data_dir: Path, seed: int, target: tuple[int, ...]):
        from anima_ft.lab.classify import DigitClassifier
        from anima_ft.lab.digits import caption_for

        self.data_dir, self.seed = data_dir, seed
        self.codec = PCAPatchCodec.load(data_dir / "codec.safetensors")
        self.text = build_text_encoder(seed)
        train = sorted((data_dir / "images").glob("*_train/*.png"))
        self.classifier = DigitClassifier(png_batch(train), [digit_label(p) for p in train])
        self.groups = {"target": [c for c in range(10) if c in target], "replay": [c for c in range(10)
                                                                                   if c not in target]}
        self.captions = [caption_for(c, 0) for c in range(10)]
        probe = sorted((data_dir / "images").glob("*_probe/*.png"))
        self.probe_by_class = [[p for p in probe if digit_label(p) == c] for c in range(10)]
        self.image_size = png_batch(probe[:1]).shape[-1]

    def score(self, images_10_n: torch.Tensor) -> dict[str, float]:
        """``{"target": acc, "replay": acc, "n_target": n, "n_replay": n}`` of ``[10, n, 3, H, W]`` images whose row
        c was prompted with digit c."""
        n = images_10_n.shape[1]
        pred = self.classifier.predict(images_10_n.flatten(0, 1)).reshape(10, n)
        out = {g: float(np.mean([pred[c] == c for c in cs])) for g, cs in self.groups.items()}
        return {**out, **{f"n_{g}": n * len(cs) for g, cs in self.groups.items()}}

    def real(self) -> torch.Tensor:
        """Held-out real images after the codec round trip, ``[10, n, 3, H, W]`` (n = the smallest class count)."""
        n_real = min(len(row) for row in self.probe_by_class)
        pixels = png_batch([p for row in self.probe_by_class for p in row[:n_real]])
        real = self.codec.decode(self.codec.encode(pixels)).clamp(-1, 1)
        return real.view(10, n_real, *real.shape[1:])

    def sample(self, model, per_class: int, num_steps: int, guidance: float, shift: float) -> torch.Tensor:
        """``[10, per_class, 3, H, W]`` samples of ``model`` for the ten captions (same noises in every row)."""
        from anima_ft.lab.grids import sample_digits

        return sample_digits(model, self.text, self.codec, self.captions, per_class,
                             self.image_size // self.codec.patch, seed=self.seed, num_steps=num_steps,
                             guidance_scale=guidance, shift=shift)


def make_grids(checkpoints: dict[str, Path], data_dir: Path, out_dir: Path, seed: int, target: tuple[int, ...],
               per_class: int, scored_per_class: int, num_steps: int, guidance: float, shift: float = 1.0) -> dict:
    """Sample ``scored_per_class`` images per digit from every checkpoint, score them with the digit classifier,
    and save grids of the first ``per_class`` (plus the codec round trip of real probe images).

    Writes ``out_dir/sample_accuracy.csv`` (checkpoint, prompts, accuracy, num_samples) and returns
    ``{"grids": {title: png path}, "accuracy": {checkpoint: {"target": acc, "replay": acc, "n_target": n,
    "n_replay": n}}}``; the checkpoint
    ``real probe images`` is the classifier's accuracy on held-out real images after the codec round trip.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))  # nothing else runs now: use every core
    try:
        return _make_grids(checkpoints, data_dir, out_dir, seed, target, per_class, scored_per_class, num_steps,
                           guidance, shift)
    finally:  # the measurements after the grids (redistribution, Question 2) run at the process's thread count, as
        torch.set_num_threads(threads)  # the e2e test's recomputation does (float32 sums differ with the threads)


def _make_grids(checkpoints: dict[str, Path], data_dir: Path, out_dir: Path, seed: int, target: tuple[int, ...],
                per_class: int, scored_per_class: int, num_steps: int, guidance: float, shift: float) -> dict:
    from anima_ft.lab.grids import save_grid
    from anima_ft.model import load_anima

    scorer = SampleScorer(data_dir, seed, target)
    labels = [str(c) for c in range(10)]
    grids, accuracy = {}, {}
    real = scorer.real()
    accuracy["real probe images"] = scorer.score(real)
    grids["real probe images (codec round trip)"] = str(save_grid(real[:, :per_class], out_dir / "real.png", labels))
    t0 = time.perf_counter()
    for i, (name, path) in enumerate(checkpoints.items()):
        logger.info("sample grids: %s (%d of %d, %.0f s so far)", name, i + 1, len(checkpoints),
                    time.perf_counter() - t0)
        model = load_anima(str(path), dtype=torch.float32)
        images = scorer.sample(model, scored_per_class, num_steps, guidance, shift)
        accuracy[name] = scorer.score(images)
        grids[f"{name}: samples for 'a handwritten digit <row>'"] = str(
            save_grid(images[:, :per_class], out_dir / f"{name}.png", labels))
    with open(out_dir / "sample_accuracy.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "prompts", "accuracy", "num_samples"])
        for name, acc in accuracy.items():
            for g in scorer.groups:
                w.writerow([name, g, repr(acc[g]), acc[f"n_{g}"]])
    return {"grids": grids, "accuracy": accuracy}
