"""Stop signals on the documented launch paths (2 CPU ranks): the checkpoint, the exit code, no orphan process, and
the resumed run's per-step losses equal to an uninterrupted run's (bitwise: same world size and thread count).

- ``deepspeed``: SIGUSR1 (or SIGTERM) to a rank process: the ranks save and exit 75, the runner exits 75.
- ``deepspeed``: SIGTERM to the runner itself: the runner dies 143 (it installs no handler on one node), but the ranks
  notice their launcher is gone, save and exit; nothing is left running.
- ``torchrun``: SIGUSR1 to a worker: the workers save and exit 75; torchrun reports ``exitcode: 75`` and exits 1 (its
  agent maps every worker failure to 1).
- During start-up (a model still loading): SIGTERM to the ranks ends them at once with 75 and nothing saved.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from anima_ft.observability import read_metrics

from .conftest import REPO, deepspeed_job, launch, torchrun_job, wait_gone

TINY = str(REPO / "configs" / "tiny_cpu.yaml")
NUM_STEPS = 40
COMMON = [f"num_steps={NUM_STEPS}", "checkpoint.every_steps=0", "logging.every_steps=1"]
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per-step losses of an uninterrupted 2-rank run."""
    run = tmp_path_factory.mktemp("ref")
    rc, out, _ = launch(["--config", TINY, f"run.dir={run}", *COMMON])
    assert rc == 0, out[-3000:]
    return {s: row["loss"] for s, row in read_metrics(run / "metrics.jsonl").items()}


def _wait_training(run, job, rows: int = 3, timeout: float = 240) -> None:
    path, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= rows):
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output[-3000:]
        time.sleep(0.1)


def _saved_step(run) -> int:
    name = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / name / "trainer.json").exists() or (run / "checkpoints" / name).is_dir()
    return int(name.removeprefix("step_"))


def _resume_matches(run, reference, saved: int) -> None:
    rc, out, _ = launch(["--config", TINY, f"run.dir={run}", *COMMON])
    assert rc == 0, out[-3000:]
    assert f"at step {saved}" in out, out[-3000:]  # continued from the stop checkpoint
    got = {s: row["loss"] for s, row in read_metrics(run / "metrics.jsonl").items()}
    assert got == reference


def _stop_mid_training_then_resume(tmp_path, reference, start_job, stop) -> None:
    """Start a 2-rank run, let it train a few steps, ``stop(job)`` it (the launch path's signal and its asserts), then
    check the stop checkpoint and that a resume from it gives the uninterrupted run's losses."""
    run = tmp_path / "run"
    job = start_job(["--config", TINY, f"run.dir={run}", *COMMON])
    try:
        _wait_training(run, job)
        stop(job)
    finally:
        job.kill()
    saved = _saved_step(run)
    assert 3 <= saved < NUM_STEPS
    _resume_matches(run, reference, saved)


def test_deepspeed_stop_signal_to_a_rank_saves_exits_75_and_resumes(tmp_path, reference):
    def stop(job):
        ranks = job.ranks()
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGUSR1)  # one rank is enough: the stop vote is all-reduced every step
        assert job.wait(timeout=120) == 75, job.output[-3000:]
        assert wait_gone(ranks, 5) == []

    _stop_mid_training_then_resume(tmp_path, reference, deepspeed_job, stop)


def test_deepspeed_runner_sigterm_saves_and_leaves_no_orphans(tmp_path, reference):
    import psutil

    def stop(job):
        below = [p.pid for p in psutil.Process(job.proc.pid).children(recursive=True)]  # launch.py and the ranks
        assert len(below) == 3
        job.proc.send_signal(signal.SIGTERM)
        assert job.wait(timeout=30) == -signal.SIGTERM  # DeepSpeed's runner has no handler: a shell sees 143
        assert wait_gone(below, 60) == [], job.output[-3000:]

    _stop_mid_training_then_resume(tmp_path, reference, deepspeed_job, stop)


def test_torchrun_stop_signal_to_a_worker_saves_and_resumes(tmp_path, reference):
    def stop(job):
        ranks = job.ranks()
        assert len(ranks) == 2
        os.kill(ranks[0], signal.SIGUSR1)
        assert job.wait(timeout=120) == 1, job.output[-3000:]  # torchrun: any worker exit code != 0 becomes 1
        assert "exitcode  : 75" in job.output, job.output[-3000:]  # the workers' own code, in torchrun's report
        assert wait_gone(ranks, 5) == []

    _stop_mid_training_then_resume(tmp_path, reference, torchrun_job, stop)


def test_stop_signal_during_startup_exits_75_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    job = deepspeed_job(["--config", TINY, f"run.dir={run}", *COMMON], env={"ANIMA_FT_STARTUP_FAULT": "sleep:300"})
    try:
        job.wait_for("start-up stalled for 300 s", count=2)  # both ranks past the rendezvous, "loading the model"
        ranks = job.ranks()
        t0 = time.monotonic()
        for pid in ranks:  # what Slurm does: every task gets the signal
            os.kill(pid, signal.SIGTERM)
        assert job.wait(timeout=60) == 75, job.output[-3000:]
        assert time.monotonic() - t0 < 15
        assert wait_gone(ranks, 5) == []
        assert "nothing to save yet, exiting 75" in job.output
    finally:
        job.kill()
    assert not (run / "checkpoints").exists()
