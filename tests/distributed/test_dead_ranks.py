"""A rank that stops responding or fails ends every rank promptly (srun-like ranks: no launcher kills the others).

- SIGSTOP on one rank mid-training: the other exits non-zero within ``dist.timeout_s`` (the watchdog's bound,
  ``anima_ft.train.distributed.PeerWatchdog``), for the store-hosting rank 0 and for rank 1.
- An error on one rank after the rendezvous (where the model loads): every rank exits 1 within seconds, and the
  others name the failed rank's error.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .conftest import REPO, srun_like_jobs

TINY = str(REPO / "configs" / "tiny_cpu.yaml")
TIMEOUT_S = 20
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _metrics_rows(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("stopped", [1, 0], ids=["rank1", "rank0_store_host"])
def test_stopped_rank_ends_the_others_within_timeout(tmp_path, stopped):
    run = tmp_path / "run"
    jobs = srun_like_jobs(["--config", TINY, f"run.dir={run}", "num_steps=100000", "checkpoint.every_steps=0",
                           "logging.every_steps=1", f"dist.timeout_s={TIMEOUT_S}"])
    try:
        deadline = time.monotonic() + 240
        while _metrics_rows(run) < 2:  # training, past the first steps
            assert time.monotonic() < deadline and all(j.proc.poll() is None for j in jobs), jobs[0].output[-3000:]
            time.sleep(0.2)
        t_stop = time.monotonic()
        os.kill(jobs[stopped].proc.pid, signal.SIGSTOP)
        other = jobs[1 - stopped]
        rc = other.wait(timeout=TIMEOUT_S + 30)
        seconds = time.monotonic() - t_stop
        print(f"rank {1 - stopped} exited {rc} {seconds:.1f} s after SIGSTOP of rank {stopped}")
        assert rc != 0, other.output[-3000:]
        assert seconds < TIMEOUT_S, (seconds, other.output[-3000:])
        assert "sent no heartbeat" in other.output or "did not answer" in other.output, other.output[-3000:]
    finally:
        for j in jobs:
            j.kill()  # SIGKILL ends the stopped one too
        for j in jobs:
            j.wait(timeout=30)


def test_error_on_one_rank_at_startup_ends_every_rank(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    jobs = srun_like_jobs(["--config", TINY, f"run.dir={run}", "dist.timeout_s=600"],
                          env={"ANIMA_FT_STARTUP_FAULT": "error:1"})
    try:
        rcs = [j.wait(timeout=180) for j in jobs]
        seconds = time.monotonic() - t0
    finally:
        for j in jobs:
            j.kill()
    assert rcs == [1, 1], [j.output[-3000:] for j in jobs]
    assert "injected start-up failure on rank 1" in jobs[1].output
    assert "a peer failed (rank 1: RuntimeError: ANIMA_FT_STARTUP_FAULT: injected start-up failure on rank 1)" in \
        jobs[0].output, jobs[0].output[-3000:]
    assert seconds < 120  # far below dist.timeout_s=600, start-up included
