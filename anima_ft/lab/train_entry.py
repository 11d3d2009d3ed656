#!/usr/bin/env python
"""The lab's training process: ``deepspeed anima_ft/lab/train_entry.py --config X.yaml [--probe-set NAME=DIR ...]
[--probe-out probe.jsonl] key=value ...``.

It is ``launch/train.py`` (load + validate the config, init the process group, the shared ``Trainer``) plus the
forgetting probe as a trainer callback: at step 0 (before the first update) and every ``eval.probe_every_steps``
steps, every rank runs :func:`anima_ft.eval.probe.evaluate_sets` (images sharded over ranks, exactly reduced) and
rank 0 appends one JSON line per probe to ``--probe-out``::

    {"step": s, "sigmas": [...], "num_noises": K, "keys": {set: [key, ...]},
     "per_image": {set: [[loss at sigma_j] per image]}, "metrics": {"probe/<set>/sigma_<s>": ..., ...}}

The final weights are exported afterwards from the run's last checkpoint with ``anima-ft export``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere

logger = logging.getLogger("anima_ft.lab.train")


class ProbeLogger:
    """Trainer callback: the fixed-sigma probe on the lab's eval sets, written as JSON lines by rank 0."""

    def __init__(self, eval_sets: dict, sigmas: list[float], num_noises: int, seed: int, out_path: Path, rank: int):
        from anima_ft.eval.probe import check_sigmas

        self.eval_sets, self.sigmas = eval_sets, check_sigmas(sigmas)
        self.num_noises, self.seed, self.out_path, self.rank = num_noises, seed, out_path, rank
        self.baseline: dict[str, list[float]] | None = None

    def __call__(self, step: int, engine, row: dict) -> None:
        """Probe the engine's module at ``step`` (collective: every rank must call)."""
        from anima_ft.eval.probe import evaluate_sets, metrics_from_losses

        module = getattr(engine, "module", engine)
        tables = evaluate_sets(module, self.eval_sets, self.sigmas, self.num_noises, self.seed)
        means = {name: t.mean(dim=0) for name, t in tables.items()}
        if self.baseline is None:
            self.baseline = {name: v.tolist() for name, v in means.items()}
        metrics = metrics_from_losses(means, self.sigmas, self.baseline)
        if self.rank == 0:
            line = {"step": step, "sigmas": list(self.sigmas), "num_noises": self.num_noises,
                    "keys": {n: [s.key for s in samples] for n, samples in self.eval_sets.items()},
                    "per_image": {n: t.tolist() for n, t in tables.items()}, "metrics": metrics}
            with open(self.out_path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
            logger.info("probe at step %d: %s", step,
                        {k: round(v, 4) for k, v in metrics.items() if k.endswith("/mean")})


def main(argv: list[str] | None = None) -> int:
    """Parse, load and validate the config, train with the probe callback."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="YAML recipe (configs/lab/*.yaml)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("--probe-set", action="append", default=[], metavar="NAME=DIR", help="probe eval set (shards)")
    ap.add_argument("--probe-out", type=Path, default=None, help="JSON-lines file for the probe results")
    ap.add_argument("--probe-sigmas", default="0.2,0.4,0.6,0.8", help="comma-separated absolute sigmas")
    ap.add_argument("--probe-noises", type=int, default=8, help="fixed noises per (image, sigma)")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. num_steps=100")
    args = ap.parse_args(argv)

    from anima_ft.config import load_config, validate
    from anima_ft.observability import setup_logging
    from anima_ft.train.distributed import env_world_size

    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, env_world_size())
        if args.probe_set and (args.probe_out is None or cfg.eval.probe_every_steps <= 0):
            raise ValueError("--probe-set needs --probe-out and eval.probe_every_steps > 0")
    except ValueError as exc:
        logger.error("bad config: %s", exc)
        return 2

    import torch.distributed as dist

    from anima_ft.eval.eval_sets import load_shard_eval_set
    from anima_ft.train.distributed import init_distributed
    from anima_ft.train.trainer import Trainer

    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    callbacks = []
    if args.probe_set:
        sets = {}
        for spec in args.probe_set:
            name, _, path = spec.partition("=")
            sets[name] = load_shard_eval_set([path], name=name)
        sigmas = [float(s) for s in args.probe_sigmas.split(",")]
        callbacks.append(ProbeLogger(sets, sigmas, args.probe_noises, cfg.run.seed, args.probe_out, env.rank))
    trainer = Trainer(cfg, env, callbacks=callbacks)
    if callbacks and trainer.state["step"] == 0:
        callbacks[0](0, trainer.engine, {})
    trainer.train()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
