"""Start and wait for ``deepspeed --num_gpus 1 launch/train.py`` runs from the GPU-session helpers.

The launcher is started as ``python -m deepspeed.launcher.runner`` (what the ``deepspeed`` script runs), so wheels
installed with ``pip --target`` work without their ``bin/`` on PATH.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
_STAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")


def free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, cpu: bool, fault: str = "", num_gpus: int = 1,
          new_session: bool = False) -> subprocess.Popen:
    """Start a ``num_gpus``-rank run of ``launch/train.py ARGS``; output is appended to ``log``.

    ``cpu``: DeepSpeed's CPU accelerator (the smoke runs); ``fault``: ``ANIMA_FT_FAULT`` (trainer fault injection);
    ``new_session``: the launcher leads its own process group, so ``os.killpg(proc.pid, ...)`` reaches every rank.
    """
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ANIMA_FT_FAULT"):
        env.pop(key, None)
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    if fault:
        env["ANIMA_FT_FAULT"] = fault
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port",
           str(free_port()), str(TRAIN), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # the child keeps its own copy of the descriptor
        f.write(f"$ {' '.join(cmd)}\n# ANIMA_FT_FAULT={fault}\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=new_session)


def wait(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, object]:
    """Exit codes by name; a run still going at ``deadline`` (unix time) is terminated and reported as ``"timeout"``."""
    out: dict[str, object] = {}
    for name, proc in procs.items():
        try:
            out[name] = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()  # the launcher forwards SIGTERM to its rank
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            out[name] = "timeout"
    return out


def log_times(log: Path, marker: str) -> tuple[float | None, float | None]:
    """``(first timestamp, timestamp of the first line containing marker)`` of a launcher log, as unix times."""
    first = hit = None
    if not log.is_file():
        return None, None
    for line in log.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
        first = t if first is None else first
        if marker in line:
            hit = t
            break
    return first, hit
