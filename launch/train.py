#!/usr/bin/env python
"""Fine-tune Anima: ``deepspeed launch/train.py --config configs/X.yaml key=value ...``.

Also runs under ``torchrun`` and Slurm ``srun`` (ranks from the environment) or as a plain ``python`` process (a
world of one). Exit codes: 0 done, 2 bad config (before any rank starts work), 75 stopped by SIGTERM/SIGUSR1 (after
saving a checkpoint once training has started; at once, with nothing to save, during start-up; the sbatch scripts
requeue on it), 1 anything else, including a peer that failed or stopped responding (see
``anima_ft.train.distributed.PeerWatchdog``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anima_ft.train.distributed import (  # noqa: E402  (imports torch; nothing here imports deepspeed)
    EXIT_PREEMPTED,
    check_extension_locks,
    fail_rank,
    install_stop_handlers,
    stop_watchdog,
    use_env_extensions_dir,
)

install_stop_handlers()  # first: a preemption notice while the model loads must still end in exit 75

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere

STARTUP_FAULT_ENV = "ANIMA_FT_STARTUP_FAULT"  # test-only, see _startup_fault


def _startup_fault(rank: int) -> None:
    """Test-only fault injection after the rendezvous, where the trainer would load the model: ``error:RANK`` raises on
    RANK (a model file that fails to load on one rank), ``sleep:SECONDS`` stalls every rank (a large model loading)."""
    kind, _, arg = os.environ.get(STARTUP_FAULT_ENV, "").partition(":")
    if kind == "error" and int(arg) == rank:
        raise RuntimeError(f"{STARTUP_FAULT_ENV}: injected start-up failure on rank {rank}")
    if kind == "sleep":
        print(f"rank {rank}: {STARTUP_FAULT_ENV}: start-up stalled for {arg} s", file=sys.stderr, flush=True)
        time.sleep(float(arg))


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
        from anima_ft.data.preflight import check_inputs

        check_inputs(cfg)  # model files, shards, and model vs data shapes: headers and indexes only
    except ValueError as exc:
        log.error("bad config: %s", exc)
        return 2
    check_extension_locks(use_env_extensions_dir())  # before deepspeed builds its CPU op

    from anima_ft.train.distributed import init_distributed
    from anima_ft.train.trainer import PREEMPTED, Trainer

    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        _startup_fault(env.rank)
        status = Trainer(cfg, env).train()
    except BaseException as exc:  # noqa: BLE001 - every failure ends the rank the same way
        fail_rank(exc)  # tells the peers (they exit 1 now instead of waiting at the next collective), exits 1
    stop_watchdog()
    import torch.distributed as dist

    dist.destroy_process_group()
    return EXIT_PREEMPTED if status == PREEMPTED else 0


if __name__ == "__main__":
    sys.exit(main())
