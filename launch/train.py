#!/usr/bin/env python
"""Fine-tune Anima: ``deepspeed launch/train.py --config configs/X.yaml key=value ...``.

Also runs under ``torchrun`` and Slurm ``srun`` (ranks from the environment) or as a plain ``python`` process (a
world of one). Exit codes: 0 done, 2 bad config (before any rank starts work), 75 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (the sbatch scripts requeue on it), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere

EXIT_PREEMPTED = 75


def main(argv: list[str] | None = None) -> int:
    """Parse, load and validate the config, build the trainer, train."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML recipe (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr.mlp=2e-5 dist.zero_stage=3")
    args = parser.parse_args(argv)

    from anima_ft.config import load_config, validate
    from anima_ft.observability import setup_logging
    from anima_ft.train.distributed import env_world_size, fill_env_from_slurm

    fill_env_from_slurm()
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank)
    log = logging.getLogger("anima_ft.launch")
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, env_world_size())  # before any process group or model exists
    except ValueError as exc:
        log.error("bad config: %s", exc)
        return 2

    from anima_ft.train.distributed import init_distributed
    from anima_ft.train.trainer import PREEMPTED, Trainer

    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    status = Trainer(cfg, env).train()
    import torch.distributed as dist

    dist.destroy_process_group()
    return EXIT_PREEMPTED if status == PREEMPTED else 0


if __name__ == "__main__":
    sys.exit(main())
