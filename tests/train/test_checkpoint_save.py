"""The checkpoint save sequence under kills: ``latest`` names a complete checkpoint at every instant, a kill at any
fault point leaves a run directory the next start resumes from, and nothing but ``keep_last`` pruning of older
steps (or a re-save replacing the same step) ever deletes a checkpoint. A fake engine stands in for DeepSpeed
(one rank, no process group); a kill is the fault hook raising instead of SIGKILL, except in one real-kill test."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anima_ft.train import checkpoint as ck

REPO = Path(__file__).resolve().parents[2]
SHARDS = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
TEMP_SUFFIXES = (ck.PARTIAL, ck.NEXT, ck.LINK, ck.TRASH)


class Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception`` in the code under test can swallow it."""


class FakeEngine:
    """Writes DeepSpeed-like shard files holding the save's id (what ``engine.save_checkpoint`` would write)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        for name in SHARDS:
            (out / name).write_text(str(client_state["trainer"]["id"]))


class Run:
    """A checkpoint root plus the ids of the saves made into it (each save gets a new id)."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last, self.next_id = root, keep_last, 0

    def save(self, step: int) -> Path:
        self.next_id += 1
        state = {"step": step, "id": self.next_id}
        return ck.save_checkpoint(FakeEngine(), self.root, step, state, {"id": self.next_id}, self.keep_last)


@pytest.fixture(autouse=True)
def _kill_raises(monkeypatch):
    def kill():
        raise Killed()

    monkeypatch.setattr(ck, "_kill", kill)
    monkeypatch.delenv(ck.SAVE_FAULT_ENV, raising=False)


def ident(ckpt: Path) -> int:
    """The id of a complete checkpoint; asserts every file (shards, rank file, trainer.json) is from one save."""
    trainer = json.loads((ckpt / "trainer.json").read_text())
    assert ckpt.name.removesuffix(ck.NEXT) == ck.tag_for(trainer["step"]), ckpt
    for name in SHARDS:
        assert (ckpt / name).read_text() == str(trainer["id"]), (ckpt, name)
    assert torch.load(ckpt / "rank_00000.pt", weights_only=False) == {"id": trainer["id"]}
    return trainer["id"]


def assert_latest_complete(root: Path) -> Path | None:
    """The invariant: ``latest`` is absent or names a complete checkpoint; find_checkpoint returns that one."""
    latest = root / "latest"
    if not latest.exists():
        assert ck.find_checkpoint(root, "auto") is None
        return None
    path = root / latest.read_text()
    ident(path)
    assert ck.find_checkpoint(root, "auto") == path
    return path


def checkpoints(root: Path) -> dict[int, int]:
    """``{id: step}`` of every complete checkpoint kept under ``root``: ``step_N``, ``rolled_back/*/step_N`` and a
    ``step_N.next`` that ``latest`` names (an unnamed ``.next`` or ``.partial`` was never published)."""
    if not root.is_dir():
        return {}
    named = (root / "latest").read_text() if (root / "latest").exists() else None
    dirs = [p for p in root.iterdir() if ck.step_of(p.name) is not None or p.name == named]
    dirs += [p for p in root.glob(f"{ck.ROLLED_BACK}/*/step_*")]
    out = {}
    for p in dirs:
        if (p / "trainer.json").is_file():
            out[ident(p)] = json.loads((p / "trainer.json").read_text())["step"]
    return out


def leftovers(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.endswith(TEMP_SUFFIXES) or p.name.endswith(".tmp"))


def restart(root: Path, resume: str = "auto") -> int:
    """A new process starting (no fault): settles the run dir; returns the step it resumes from."""
    ckpt = ck.resolve_resume(root, resume)
    assert_latest_complete(root)
    assert leftovers(root) == []
    return 0 if ckpt is None else json.loads((ckpt / "trainer.json").read_text())["step"]


def steps_in(root: Path) -> list[int]:
    return [s for s, _ in ck._step_dirs(root)]


# -- every fault point, by the phase that passes it ---------------------------------------------------------------
@pytest.mark.parametrize("point", sorted(ck.FAULT_POINTS))
def test_kill_at_every_fault_point_then_resume(tmp_path, monkeypatch, point):
    phase = ck.FAULT_POINTS[point][0]
    run = Run(tmp_path / "checkpoints", keep_last=2 if phase != "rollback" else 0)
    for step in (2, 4) if phase == "save" else (2, 4, 6):
        run.save(step)
    before = checkpoints(run.root)
    monkeypatch.setenv(ck.SAVE_FAULT_ENV, point)
    with pytest.raises(Killed):
        if phase == "save":
            run.save(6)  # prunes step 2
        elif phase == "resave":
            run.save(6)  # a finished run launched again
        else:
            ck.resolve_resume(run.root, str(run.root / "step_00000002"))
    monkeypatch.delenv(ck.SAVE_FAULT_ENV)
    assert_latest_complete(run.root)
    after = checkpoints(run.root)
    lost = {i: s for i, s in before.items() if i not in after}
    if phase == "save":
        assert set(lost.values()) <= {2}  # only the pruned older step
        step = restart(run.root)
        assert step in (4, 6)
        for s in range(step + 2, 10, 2):  # training goes on to step 8 (a kill before pruning: pruned then)
            run.save(s)
        assert steps_in(run.root) == [6, 8]
    elif phase == "resave":
        assert set(lost.values()) <= {6}  # only the replaced copy of step 6
        assert restart(run.root) == 6 and steps_in(run.root) == [4, 6]
        run.save(6)
        assert steps_in(run.root) == [4, 6]
    else:
        assert lost == {}
        # the requeue runs the same command: the rollback is done again, then training goes on from step 2
        assert restart(run.root, str(run.root / "step_00000002")) == 2
        assert steps_in(run.root) == [2] and sorted(checkpoints(run.root)) == sorted(before)
        run.save(4)
        run.save(6)
        assert steps_in(run.root) == [2, 4, 6]
    last = assert_latest_complete(run.root)
    assert last.name == ck.tag_for(8 if phase == "save" else 6)
    assert ident(last) == run.next_id and leftovers(run.root) == []


def test_invariant_holds_at_every_point_of_one_save(tmp_path, monkeypatch):
    """Without killing: at each fault point of a fresh save, a re-save and a rollback, ``latest`` is complete."""
    seen = []

    def hook(rank, step):
        def hit(point):
            seen.append(point)
            assert_latest_complete(run.root)
        return hit

    monkeypatch.setattr(ck, "fault_hook", hook)
    run = Run(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 6, 6):
        run.save(step)
    ck.resolve_resume(run.root, str(run.root / "step_00000004"))
    assert set(seen) == set(ck.FAULT_POINTS)  # every point was passed and checked


def test_resave_of_the_step_latest_names_replaces_it(tmp_path):
    run = Run(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 6):
        run.save(step)
    kept = ident(run.root / "step_00000004")
    run.save(6)
    assert steps_in(run.root) == [4, 6] and leftovers(run.root) == []
    assert ident(run.root / "step_00000006") == run.next_id and ident(run.root / "step_00000004") == kept
    assert (run.root / "latest").read_text() == "step_00000006"


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_rollback_with_keep_last_newer_checkpoints_moves_them_aside(tmp_path, caplog, where):
    """The issue's case: resuming an older checkpoint with keep_last newer ones in the run dir used to prune the
    checkpoint just written (name order). Now the newer ones are moved to rolled_back/, warned, kept intact."""
    run = Run(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 6, 8):
        run.save(step)
    assert steps_in(run.root) == [6, 8]
    if where == "inside":
        resume = run.root / "step_00000006"
    else:  # a checkpoint of another run, older than everything here
        other = Run(tmp_path / "other", keep_last=0)
        other.save(2)
        resume = other.root / "step_00000002"
    newer = {s: ident(p) for s, p in ck._step_dirs(run.root) if p != resume}
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        step = restart(run.root, str(resume))
    moved = sorted(run.root.glob("rolled_back/*/step_*"))
    assert {ident(p): ck.step_of(p.name) for p in moved} == {v: k for k, v in newer.items()}
    assert all(p.name in caplog.text for p in moved) and "rolled_back" in caplog.text
    if where == "inside":
        assert steps_in(run.root) == [6] and (run.root / "latest").read_text() == "step_00000006"
    else:
        assert steps_in(run.root) == [] and not (run.root / "latest").exists()
    for s in range(step + 2, 10, 2):
        path = run.save(s)
        assert assert_latest_complete(run.root) == path  # the checkpoint just written is never pruned
    assert ident(run.root / "step_00000008") == run.next_id
    assert steps_in(run.root) == [6, 8]
    assert {ident(p) for p in moved} <= set(checkpoints(run.root))  # still there after later saves


def test_resume_none_moves_existing_checkpoints_aside(tmp_path):
    run = Run(tmp_path / "checkpoints", keep_last=0)
    for step in (2, 4):
        run.save(step)
    before = checkpoints(run.root)
    assert restart(run.root, "none") == 0
    assert steps_in(run.root) == [] and checkpoints(run.root) == before
    run.save(2)
    assert (run.root / "latest").read_text() == "step_00000002" and len(checkpoints(run.root)) == 3


def test_prune_by_step_number_not_name_order(tmp_path):
    """step_100000000 (9 digits) sorts before step_99999999 by name; pruning uses the parsed number."""
    run = Run(tmp_path / "checkpoints", keep_last=2)
    for step in (99_999_998, 99_999_999, 100_000_000):
        run.save(step)
    assert steps_in(run.root) == [99_999_999, 100_000_000]


def test_fault_spec_is_checked(monkeypatch):
    monkeypatch.setenv(ck.SAVE_FAULT_ENV, "no_such_point")
    with pytest.raises(ValueError, match="ANIMA_FT_SAVE_FAULT='no_such_point'"):
        ck.fault_hook(0, 1)
    monkeypatch.setenv(ck.SAVE_FAULT_ENV, "renamed:1")
    with pytest.raises(ValueError, match="only rank 0 passes 'renamed'"):
        ck.fault_hook(1, 1)
    monkeypatch.setenv(ck.SAVE_FAULT_ENV, "shards_written:1:4")
    ck.fault_hook(0, 4)("shards_written")  # another rank: no kill
    ck.fault_hook(1, 2)("shards_written")  # another step: no kill
    with pytest.raises(Killed):
        ck.fault_hook(1, 4)("shards_written")


_REAL_KILL = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_checkpoint_save import Run
run = Run(Path({root!r}), keep_last=2)
run.save(2)
run.save(4)
"""


def test_real_sigkill_at_a_fault_point(tmp_path):
    """The fault hook really SIGKILLs the process (here: after step_4 got its name, before ``latest``)."""
    code = _REAL_KILL.format(tests=str(Path(__file__).parent), root=str(tmp_path / "checkpoints"))
    env = dict(os.environ, PYTHONPATH=str(REPO), **{ck.SAVE_FAULT_ENV: "renamed:0:4"})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002" and steps_in(root) == [2, 4]
    assert restart(root) == 2
    assert steps_in(root) == [2] and [p.name for p in root.glob("rolled_back/*/*")] == ["step_00000004"]


# -- property: random saves, re-saves, resumes and kills ----------------------------------------------------------
POINTS = sorted(ck.FAULT_POINTS)
OPS = st.one_of(
    st.tuples(st.just("train"), st.integers(1, 3), st.none() | st.sampled_from(POINTS)),
    st.tuples(st.just("resave"), st.just(0), st.none() | st.sampled_from(POINTS)),
    st.tuples(st.just("resume_dir"), st.integers(0, 20), st.none() | st.sampled_from(POINTS)),
    st.tuples(st.just("resume_none"), st.just(0), st.none()),
    st.tuples(st.just("restart"), st.just(0), st.none()),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(keep_last=st.integers(0, 3), ops=st.lists(OPS, min_size=1, max_size=12))
def test_property_random_saves_resumes_kills(keep_last, ops):
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp) / "checkpoints", keep_last)
        step = 0
        for kind, arg, fault in ops:
            before = checkpoints(run.root)
            older = sorted((s, i) for i, s in before.items() if i in _root_ids(run.root))
            if fault:
                os.environ[ck.SAVE_FAULT_ENV] = fault
            killed = False
            try:
                if kind in ("train", "resave"):
                    if step + arg == 0:  # nothing trained yet: the trainer never saves step 0
                        continue
                    save_step = step + arg
                    run.save(save_step)
                    step = save_step
                elif kind == "resume_dir":
                    choices = sorted(p for p in [*run.root.glob("step_*"), *run.root.glob("rolled_back/*/step_*")]
                                     if ck.step_of(p.name) is not None and (p / "trainer.json").is_file())
                    if not choices:
                        continue
                    resume = str(choices[arg % len(choices)])
                    step = json.loads((ck.resolve_resume(run.root, resume) / "trainer.json").read_text())["step"]
                elif kind == "resume_none":
                    step = restart(run.root, "none")
                    assert steps_in(run.root) == []
                else:
                    step = restart(run.root)
            except Killed:
                killed = True
            finally:
                os.environ.pop(ck.SAVE_FAULT_ENV, None)
            assert_latest_complete(run.root)
            if killed:
                step = restart(run.root, resume if kind == "resume_dir" else "auto")
            if kind == "resume_dir":
                _assert_rolled_back(run.root, Path(resume), step)
            after = checkpoints(run.root)
            lost = {i: s for i, s in before.items() if i not in after}
            if kind in ("train", "resave"):
                # pruned: older than the step saved and not among the newest keep_last - 1 of those
                prunable = {i for s, i in older if s < save_step}
                if keep_last > 0:
                    prunable = set(sorted(prunable, key=lambda i: before[i])[:max(0, len(prunable) - keep_last + 1)])
                else:
                    prunable = set()
                replaced = {i for i, s in before.items() if s == save_step and i in _root_ids_of(older)}
                assert set(lost) <= prunable | replaced, (kind, save_step, lost, prunable, replaced)
                if set(lost) & replaced:
                    assert save_step in steps_in(run.root)
                if not killed:
                    assert leftovers(run.root) == []
                    assert (run.root / "latest").read_text() == ck.tag_for(save_step)
                    if keep_last > 0:
                        assert len([s for s in steps_in(run.root) if s < save_step]) <= keep_last - 1
            else:
                assert lost == {}, (kind, lost)
            assert all(s <= step for s in steps_in(run.root))  # nothing newer than where training is


def _root_ids(root: Path) -> set[int]:
    return {ident(p) for _, p in ck._step_dirs(root) if (p / "trainer.json").is_file()}


def _root_ids_of(older: list[tuple[int, int]]) -> set[int]:
    return {i for _, i in older}


def _assert_rolled_back(root: Path, resume: Path, step: int) -> None:
    inside = resume.resolve().parent == root.resolve()
    assert all(s < step or (inside and s == step) for s in steps_in(root))
