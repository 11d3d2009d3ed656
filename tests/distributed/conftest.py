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
    """The environment of a rank process: one intra-op thread (``RANK_THREADS`` in tests/conftest.py: the condition
    of every bitwise comparison with another process), CPU accelerator, no wandb, no inherited rank variables."""
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


TORCHRUN = Path(sys.executable).with_name("torchrun")


class Job:
    """A launcher or rank process started in its own session, its output collected line by line in a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        import threading

        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        """Everything printed so far."""
        return "".join(self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = 240) -> None:
        """Block until ``text`` has been printed ``count`` times (fails the test on timeout or early exit)."""
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"waited for {text!r} x{count}; rc={self.proc.poll()}\n{self.output[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float = 240) -> int:
        """The exit code (the reader has drained the output)."""
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def ranks(self) -> list[int]:
        """Pids of the ``launch/train.py`` rank processes below this launcher (the launcher itself excluded)."""
        import psutil

        kids = psutil.Process(self.proc.pid).children(recursive=True)
        cmds = {k.pid: " ".join(_cmdline(k)) for k in kids}
        return [pid for pid, cmd in cmds.items() if str(TRAIN) in cmd and "deepspeed.launcher" not in cmd]

    def kill(self) -> None:
        """SIGKILL the whole session (test clean-up)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def alive(pids: list[int]) -> list[int]:
    """The pids in ``pids`` that still run (zombies count as gone)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def deepspeed_job(args: list[str], nproc: int = 2, env: dict[str, str] | None = None) -> Job:
    """``deepspeed --num_gpus nproc launch/train.py ARGS`` as a :class:`Job`."""
    return Job([str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(TRAIN), *args], env)


def torchrun_job(args: list[str], nproc: int = 2, env: dict[str, str] | None = None) -> Job:
    """``torchrun --nproc_per_node nproc launch/train.py ARGS`` as a :class:`Job`."""
    return Job([str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                str(free_port()), str(TRAIN), *args], env)


def srun_like_jobs(args: list[str], nproc: int = 2, env: dict[str, str] | None = None) -> list[Job]:
    """One ``launch/slurm/run_task.sh`` process per rank with a Slurm-like environment (what ``srun`` starts): no
    launcher watches them, so each rank must end itself when a peer fails."""
    port = str(free_port())
    jobs = []
    for rank in range(nproc):
        slurm = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nproc), "SLURM_LOCALID": str(rank),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {})}
        jobs.append(Job(["bash", str(REPO / "launch/slurm/run_task.sh"), *args], slurm))
    return jobs
