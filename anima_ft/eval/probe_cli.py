"""``anima-ft probe CHECKPOINT... --eval-set NAME=PATH``: the forgetting probe on exported checkpoints.

Writes ``probe.csv`` (checkpoint, step, set, sigma, loss, rel_to_first), ``probe_samples.csv`` (per image) and
``probe_loss.png`` / ``probe_loss_rel.png`` (loss against step or checkpoint, one line per sigma, one panel per set)
into ``--out-dir``. Runs on one process, or sharded under ``torchrun`` (rank 0 writes the files).

Eval-set paths are shard directories/globs from ``anima-ft prepare``, or image folders (``*.png``/``*.jpg`` with
optional same-stem ``.txt`` captions) that are encoded on the fly with ``--vae`` and ``--qwen`` (same flags as
``anima-ft prepare``; each image is resized and center-cropped to its nearest bucket of ``--bucket-area``). The step of each checkpoint is read from its
file name (``..._step1200.safetensors``, ``step-1200``, ``global_step1200``) unless ``--steps`` gives them; without
steps the x axis is the checkpoint name.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from anima_ft.command_errors import reports_input_errors
from anima_ft.eval.probe import evaluate_sets
from anima_ft.eval.probe_inputs import add_probe_args, eval_sets_from_args, resolve_dtype, step_from_name

logger = logging.getLogger(__name__)

def _init_distributed(device: str) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return True
    return False


def write_outputs(out_dir: Path, labels: list[str], steps: list[int | None], results: list[dict], sigmas, keys):
    """Write probe.csv, probe_samples.csv and the two PNGs from per-checkpoint ``{set: [N, J]}`` tables."""
    from anima_ft.eval.plots import probe_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    means = {name: [res[name].mean(0).tolist() for res in results] for name in results[0]}
    with open(out_dir / "probe.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "step", "set", "sigma", "loss", "rel_to_first"])
        for c, (label, step) in enumerate(zip(labels, steps)):
            for name, rows in means.items():
                for j, sigma in enumerate(sigmas):
                    w.writerow([label, "" if step is None else step, name, sigma, repr(rows[c][j]),
                                repr(rows[c][j] / rows[0][j])])
    with open(out_dir / "probe_samples.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "set", "key", "sigma", "loss"])
        for label, res in zip(labels, results):
            for name, table in res.items():
                for key, row in zip(keys[name], table.tolist()):
                    for sigma, v in zip(sigmas, row):
                        w.writerow([label, name, key, sigma, repr(v)])
    numeric = all(s is not None for s in steps)
    x = [str(s) for s in steps] if numeric else labels
    x_title = "training step" if numeric else "checkpoint"
    probe_plot(x, means, sigmas, out_dir / "probe_loss.png", x_title)
    probe_plot(x, means, sigmas, out_dir / "probe_loss_rel.png", x_title, relative=True)


@reports_input_errors("anima-ft probe")
def main(argv: list[str]) -> int:
    """Entry point of ``anima-ft probe``."""
    ap = argparse.ArgumentParser(prog="anima-ft probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="exported .safetensors checkpoints, in training order")
    ap.add_argument("--adapter", default=None, help="separate adapter file for checkpoints that hold only the DiT")
    ap.add_argument("--steps", default=None, help="comma-separated step per checkpoint (default: from file names)")
    add_probe_args(ap)
    args = ap.parse_args(argv)
    if args.out_dir is None:
        ap.error("--out-dir is required")
    from anima_ft.model import load_anima

    distributed = _init_distributed(args.device)
    rank = dist.get_rank() if distributed else 0
    try:
        eval_sets = eval_sets_from_args(args)
        steps = ([int(s) for s in args.steps.split(",")] if args.steps
                 else [step_from_name(p) for p in args.checkpoints])
        if len(steps) != len(args.checkpoints):
            ap.error(f"--steps has {len(steps)} values for {len(args.checkpoints)} checkpoints")
        results = []
        for path in args.checkpoints:
            model = load_anima(path, adapter_path=args.adapter, device=args.device, dtype=resolve_dtype(args.dtype))
            results.append(evaluate_sets(model, eval_sets, args.sigmas, args.num_noises, args.seed,
                                         progress=f"probe {Path(path).name}"))
            logger.info("probed %s: %s", path, {k: v.mean(0).tolist() for k, v in results[-1].items()})
            del model
        if rank == 0:
            labels = [Path(p).stem for p in args.checkpoints]
            keys = {name: [s.key for s in samples] for name, samples in eval_sets.items()}
            write_outputs(Path(args.out_dir), labels, steps, results, args.sigmas, keys)
            print((Path(args.out_dir) / "probe.csv").read_text())
            print(f"wrote {args.out_dir}/probe.csv, probe_samples.csv, probe_loss.png, probe_loss_rel.png")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0
