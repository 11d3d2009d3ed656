"""Helpers for multi-process CPU runs: launch ``launch/train.py`` under a launcher with a hard timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def launch(args: list[str], nproc: int = 2, timeout: float = 240, env: dict[str, str] | None = None):
    """Run ``deepspeed --num_gpus nproc launch/train.py ARGS``; returns (returncode, output, seconds)."""
    cmd = [str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(TRAIN), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(env), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


@pytest.fixture(scope="session")
def launcher():
    """The :func:`launch` helper."""
    return launch
