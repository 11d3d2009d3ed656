"""The ranks of one lab training run, started on this machine without a launcher process.

``launch/train.py`` takes its ranks from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), as under ``torchrun`` or ``srun``. The lab starts its ``nproc`` rank processes with that environment
itself: the ``deepspeed`` command-line launcher would add two Python processes per run (its runner and its per-node
launcher, each importing DeepSpeed, and a one-second polling loop), about 7 s of a 30-s fine-tune on 2 CPU cores
(docs/lab.md#timings). The ranks and their training are the same: same engine, same rendezvous, same results bit
for bit.

A rank that fails tells its peers through the trainer's watchdog (``anima_ft.train.distributed.PeerWatchdog``) and
they exit too; :class:`LocalRanks` also stops the ranks still alive ``grace_s`` after the first failure, so a run
never outlives its first failed rank by more than that.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import IO

from anima_ft.runtime import free_port

POLL_S = 0.05


def rank_env(env: Mapping[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """``env`` plus the rank variables of rank ``rank`` of ``nproc`` on this machine (``LOCAL_SIZE`` too: the count
    DeepSpeed's CPU accelerator reads)."""
    return {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(nproc)}


def command_lines(argv: Sequence[str], nproc: int, port: int) -> str:
    """Shell lines that start the same ranks by hand, one per rank (for the run's ``command.txt``)."""
    lines = []
    for rank in range(nproc):
        prefix = " ".join(f"{k}={v}" for k, v in rank_env({}, rank, nproc, port).items())
        lines.append(f"{prefix} {shlex.join(argv)}{' &' if rank < nproc - 1 else ''}")
    return "\n".join(lines) + "\n"


class LocalRanks:
    """``nproc`` processes of ``argv``, one per rank, writing to ``log``; ``wait``/``poll`` like ``subprocess.Popen``.

    The exit code is 0 when every rank exits 0, otherwise the code of the first rank seen failing (ranks stopped
    here after it do not hide it)."""

    def __init__(self, argv: Sequence[str], nproc: int, env: Mapping[str, str], log: IO, cwd: str | os.PathLike,
                 grace_s: float = 30.0):
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        self.port = free_port()
        self.grace_s = grace_s
        self.first_failure: tuple[float, int] | None = None  # (time, exit code)
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(nproc):
                self.procs.append(subprocess.Popen(list(argv), env=rank_env(env, rank, nproc, self.port), stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True))
        except BaseException:
            self.terminate()
            raise

    def poll(self) -> int | None:
        """The run's exit code once every rank has exited, else None (stops the others ``grace_s`` after a
        failure)."""
        codes = [p.poll() for p in self.procs]
        if self.first_failure is None:
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:
                self.first_failure = (time.monotonic(), failed)
        if all(c is not None for c in codes):
            return 0 if self.first_failure is None else self.first_failure[1]
        if self.first_failure is not None and time.monotonic() - self.first_failure[0] > self.grace_s:
            self.terminate()
        return None

    def wait(self, timeout: float | None = None) -> int:
        """Block until :meth:`poll` has a code; ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired([p.args for p in self.procs], timeout)
            time.sleep(POLL_S)
        return rc

    def terminate(self, wait_s: float = 10.0) -> None:
        """SIGTERM to every live rank's process group (a rank saves nothing before training starts and a
        checkpoint after: ``launch/train.py``), SIGKILL to those alive ``wait_s`` later."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        end = time.monotonic() + wait_s
        for p in live:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
