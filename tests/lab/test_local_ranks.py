"""The lab's rank starter (anima_ft.lab.local_ranks): the environment contract launch/train.py reads, exit codes
of every combination of rank outcomes, the bound on how long a run outlives its first failed rank, and that the
ranks it starts train bit for bit as the deepspeed launcher's do (slow)."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from anima_ft.lab.local_ranks import LocalRanks, command_lines, rank_env

# a rank that writes what it sees, then exits with the code given for its rank (or sleeps when the code is "hang")
RANK_SCRIPT = r"""
import json, os, sys, time
out = sys.argv[1]
codes = sys.argv[2].split(",")
rank = int(os.environ["RANK"])
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "LAB_EXTRA")
json.dump({k: os.environ.get(k) for k in keys}, open(f"{out}/rank{rank}.json", "w"))
code = codes[rank]
if code == "hang":
    time.sleep(600)
time.sleep(float(sys.argv[3]) * rank)  # later ranks end later
sys.exit(int(code))
"""


def _start(tmp_path, codes, stagger=0.0, grace_s=30.0):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    log = open(tmp_path / "log.txt", "w")
    argv = [sys.executable, str(script), str(tmp_path), ",".join(map(str, codes)), str(stagger)]
    return LocalRanks(argv, len(codes), {**os.environ, "LAB_EXTRA": "kept"}, log, tmp_path, grace_s=grace_s), log


def test_every_rank_sees_the_environment_launch_train_reads(tmp_path, monkeypatch):
    from anima_ft.train.distributed import env_world_size

    ranks, log = _start(tmp_path, [0, 0, 0])
    assert ranks.wait(timeout=60) == 0
    log.close()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r, env in enumerate(seen):
        assert env == {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "LOCAL_SIZE": "3",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ranks.port), "LAB_EXTRA": "kept"}
    for key, value in rank_env({}, 1, 3, ranks.port).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert env_world_size() == 3  # what the trainer's validation reads before any process group exists


@pytest.mark.parametrize("codes", list(itertools.product([0, 1, 75], repeat=2)))
def test_exit_code_is_zero_only_when_every_rank_succeeds(tmp_path, codes):
    ranks, log = _start(tmp_path, list(codes), stagger=0.3)
    rc = ranks.wait(timeout=60)
    log.close()
    failed = [c for c in codes if c != 0]
    # the first failure seen: rank 0's when it failed (it ends first), else rank 1's
    assert rc == (failed[0] if failed else 0)


def test_a_run_never_outlives_its_first_failed_rank_by_more_than_the_grace(tmp_path):
    ranks, log = _start(tmp_path, [3, "hang"], grace_s=1.0)
    t0 = time.monotonic()
    assert ranks.wait(timeout=60) == 3  # the hanging peer was stopped; the failure's code is kept
    log.close()
    assert time.monotonic() - t0 < 1.0 + 10.0 + 5.0  # grace + SIGTERM wait + polling
    assert all(p.poll() is not None for p in ranks.procs)


def test_wait_times_out_like_popen_and_terminate_stops_every_rank(tmp_path):
    ranks, log = _start(tmp_path, ["hang", "hang"])
    with pytest.raises(subprocess.TimeoutExpired):
        ranks.wait(timeout=0.2)
    ranks.terminate(wait_s=5.0)
    log.close()
    assert [p.returncode for p in ranks.procs] == [-15, -15]


def test_command_lines_restart_the_same_ranks_by_hand():
    argv = ["/x/python", "-u", "/r/launch/train.py", "--config", "c.yaml", "eval.sets=[{name: a, path: '/p q'}]"]
    lines = command_lines(argv, 2, 1234).splitlines()
    assert len(lines) == 2 and lines[0].endswith(" &") and not lines[1].endswith("&")
    for r, line in enumerate(lines):
        words = shlex.split(line.rstrip(" &"))
        env = dict(w.split("=", 1) for w in words[:6])
        assert env == rank_env({}, r, 2, 1234)
        assert words[6:] == argv  # quoting survives a shell


@pytest.mark.slow
@pytest.mark.multiproc
def test_local_ranks_train_bit_for_bit_as_the_deepspeed_launcher(tmp_path):
    from anima_ft.observability import read_metrics
    from tests.distributed.conftest import REPO, TRAIN, launch, run_env

    args = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "num_steps=4", "checkpoint.every_steps=4"]
    rc, out, _ = launch([*args, f"run.dir={tmp_path / 'ds'}"], timeout=240)
    assert rc == 0, out[-3000:]
    with open(tmp_path / "local.log", "w") as log:
        ranks = LocalRanks([sys.executable, "-u", str(TRAIN), *args, f"run.dir={tmp_path / 'local'}"], 2, run_env(),
                           log, REPO)
        assert ranks.wait(timeout=240) == 0, (tmp_path / "local.log").read_text()[-3000:]
    ds, local = read_metrics(tmp_path / "ds" / "metrics.jsonl"), read_metrics(tmp_path / "local" / "metrics.jsonl")
    losses = [(s, m["loss"]) for s, m in sorted(ds.items()) if "loss" in m]
    assert len(losses) == 4
    assert losses == [(s, m["loss"]) for s, m in sorted(local.items()) if "loss" in m]
