"""Real tiny_cpu runs (1 and 2 CPU ranks) SIGKILLed at every checkpoint fault point (``ANIMA_FT_SAVE_FAULT``),
then launched again: ``latest`` names a complete checkpoint right after the kill, and the next launch continues to
per-step losses (metrics.jsonl) and final weights bitwise equal to one uninterrupted run.

The recipe saves at steps 2 and 4 (``every_steps=2``) and at the end (step 5, ``save_at_end``), keeping 2; the save
of step 5 prunes step 2. Per phase of :data:`FAULT_POINTS`:

- ``save``: a fresh run killed in the save of step 5, then ``resume=auto``;
- ``resave``: a copy of the finished reference run launched again (it saves step 5 again), killed, launched again;
- ``rollback``: a copy of the finished run resumed with ``checkpoint.resume=.../step_00000004``, killed while
  moving step 5 aside, then the same command again (a requeue runs the same command).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anima_ft.observability import read_metrics
from anima_ft.train.checkpoint import FAULT_POINTS, SAVE_FAULT_ENV, step_of, tag_for
from tests.distributed.conftest import REPO, TRAIN, launch, run_env

TINY = str(REPO / "configs" / "tiny_cpu.yaml")
RECIPE = ["num_steps=5", "checkpoint.every_steps=2", "checkpoint.keep_last=2"]
LAST = 5
TEMP_SUFFIXES = (".partial", ".next", ".link", ".trash", ".tmp")


def _train(nproc: int, run: Path, extra: list[str] = (), fault: str | None = None) -> tuple[int, str]:
    """``launch/train.py`` on ``nproc`` CPU ranks (deepspeed launcher; a plain process for one rank)."""
    args = ["--config", TINY, f"run.dir={run}", *RECIPE, *extra]
    env = {SAVE_FAULT_ENV: fault} if fault else {}
    if nproc > 1:
        rc, out, _ = launch(args, nproc=nproc, env=env, timeout=300)
        return rc, out
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=run_env(env), capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a, b, name)


def _assert_latest_complete(root: Path, nproc: int) -> Path:
    """``latest`` names a directory holding every file of a ZeRO-2 checkpoint of ``nproc`` ranks."""
    ckpt = root / (root / "latest").read_text()
    names = {p.name for p in ckpt.iterdir()}
    expected = {"trainer.json", "mp_rank_00_model_states.pt", *(f"rank_{r:05d}.pt" for r in range(nproc)),
                *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(nproc))}
    assert expected <= names, (ckpt, sorted(names))
    return ckpt


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """``nproc -> run dir`` of the uninterrupted run (made once per rank count)."""
    cache: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in cache:
            run = tmp_path_factory.mktemp(f"ref{nproc}") / "run"
            rc, out = _train(nproc, run)
            assert rc == 0, out[-4000:]
            assert sorted(step_of(p.name) for p in (run / "checkpoints").glob("step_*")) == [4, LAST]
            cache[nproc] = run
        return cache[nproc]

    return get


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("point", sorted(FAULT_POINTS))
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_at_save_point_then_resume_is_bitwise(tmp_path, references, nproc, point):
    phase, ranks = FAULT_POINTS[point]
    rank = 1 if nproc == 2 and ranks == "all" else 0
    ref = references(nproc)
    run = tmp_path / "run"
    extra: list[str] = []
    if phase != "save":
        shutil.copytree(ref, run)  # a finished run
    if phase == "rollback":
        extra = [f"checkpoint.resume={run / 'checkpoints' / tag_for(4)}"]
    fault_step = 4 if phase == "rollback" else LAST

    rc, killed = _train(nproc, run, extra, fault=f"{point}:{rank}:{fault_step}")
    assert rc != 0, killed[-4000:]
    assert f"killing rank {rank} at save point '{point}' (step {fault_step})" in killed, killed[-4000:]
    _assert_latest_complete(run / "checkpoints", nproc)

    rc, out = _train(nproc, run, extra)
    assert rc == 0, out[-4000:]
    if phase == "save":
        assert "resumed from" in out
    got, want = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, LAST + 1))
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
    root = run / "checkpoints"
    assert _assert_latest_complete(root, nproc).name == tag_for(LAST)
    _assert_same_weights(root / tag_for(LAST), ref / "checkpoints" / tag_for(LAST))
    assert sorted(step_of(p.name) for p in root.glob("step_*") if step_of(p.name) is not None) == [4, LAST]
    assert not [p.name for p in root.iterdir() if p.name.endswith(TEMP_SUFFIXES)]
    if phase == "rollback":  # the checkpoint rolled back over is kept, intact
        moved = sorted(root.glob(f"rolled_back/*/{tag_for(LAST)}"))
        assert moved and "moving this run's newer checkpoints ['step_00000005']" in killed + out
        for p in moved:
            _assert_same_weights(p, ref / "checkpoints" / tag_for(LAST))
