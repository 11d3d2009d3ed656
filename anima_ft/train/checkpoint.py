"""Sharded training checkpoints: DeepSpeed model/optimizer shards + trainer state + per-rank state.

Layout of ``RUN/checkpoints``::

    step_00000200/             one complete checkpoint (DeepSpeed shards, rank_00000.pt, ..., trainer.json)
    latest                     text file naming a complete checkpoint (absent before the first save)
    rolled_back/<when>_to_step_00000100/step_00000200/   checkpoints moved aside by a rollback (never deleted)
    step_00000300.partial/     temporary names of an unfinished save: never chosen, removed at the next save or
    step_00000300.next/        start (``.next`` is finished instead while ``latest`` names it)
    step_00000300.link/, step_00000100.trash/

Invariant: at every instant ``latest`` names a complete checkpoint. A directory gets a name that ``latest`` may
point at only once it is complete (``trainer.json`` is written by rank 0 after every rank's files are fsync'd), and
``latest`` is rewritten (atomically) only to name such a directory. A checkpoint is deleted only by ``keep_last``
pruning of steps older than the one just saved, or when the same step is saved again (replaced); deletions rename
to ``.trash`` first, so a half-deleted directory never keeps a checkpoint's name.

Save (:func:`save_checkpoint`, collective; rank 0 renames):

1. rank 0 removes leftovers of an interrupted save; barrier.
2. every rank writes its DeepSpeed shards and ``rank_XXXXX.pt`` into ``step_N.partial`` and fsyncs them; barrier.
3. rank 0 writes ``trainer.json``, then for a new step renames ``step_N.partial`` -> ``step_N`` and rewrites
   ``latest``. A re-save of an existing ``step_N`` (a finished run launched again) renames the new copy to
   ``step_N.next`` and points ``latest`` at it, moves the old ``step_N`` to ``.trash``, hard-links ``step_N.next``
   into ``step_N.link`` and renames that to ``step_N``, points ``latest`` back at ``step_N``, then deletes the rest.
4. rank 0 prunes by parsed step number: of the checkpoints older than ``step_N`` all but the newest
   ``keep_last - 1`` go (never ``step_N``, never the one ``latest`` names, never newer ones); barrier.

Start (:func:`resolve_resume`, collective): rank 0 finishes an interrupted re-save, removes leftovers and rolls
back: checkpoints of this run newer than the one resumed (all of them for ``resume=none``; newer than ``latest``
after a save killed before it rewrote ``latest``) are moved to ``rolled_back/`` with a warning naming them, after
``latest`` was pointed at a checkpoint that stays. Per-rank files hold that rank's RNG states and data-stream
position. A resume on another world size adds ``step_N/universal/`` (``reshard.py``; :func:`read_rank_states`).

Fault injection (tests only): ``ANIMA_FT_SAVE_FAULT=<point>[:<rank>[:<step>]]`` SIGKILLs that rank (default 0) at
the named point of the save of ``step`` (default: any save; for the start-time ``rollback_*`` points, the resumed
step). The points are :data:`FAULT_POINTS`; the environment is read once per save or start, not per step.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from anima_ft.runtime import atomic_write_text, fsync_dir, world_and_rank, write_json_atomic

logger = logging.getLogger(__name__)
LATEST = "latest"
PARTIAL, NEXT, LINK, TRASH = ".partial", ".next", ".link", ".trash"
ROLLED_BACK = "rolled_back"
SAVE_FAULT_ENV = "ANIMA_FT_SAVE_FAULT"
_STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"step_\d+(\.partial|\.next|\.link)?(\.trash)?")
_RANK_OF_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rank_(\d+)\.pt$")

# Every point where a save (or the rollback at start) can be killed: name -> (phase, ranks that pass it).
# Phase "save": every save; "resave": saving a step that already exists; "rollback": resolve_resume.
FAULT_POINTS: dict[str, tuple[str, str]] = {
    "save_cleaned": ("save", "0"),           # leftovers of an earlier save removed
    "shards_written": ("save", "all"),       # this rank's DeepSpeed shards are in step_N.partial
    "rank_state_written": ("save", "all"),   # ... and its rank_XXXXX.pt, fsync'd
    "trainer_json_written": ("save", "0"),   # step_N.partial is complete
    "renamed": ("save", "0"),                # step_N.partial -> step_N
    "latest_written": ("save", "0"),         # latest names step_N
    "resave_renamed": ("resave", "0"),       # step_N.partial -> step_N.next
    "resave_latest_next": ("resave", "0"),   # latest names step_N.next
    "resave_old_moved": ("resave", "0"),     # old step_N -> step_N.trash
    "resave_linked": ("resave", "0"),        # hard-linked copy step_N.link -> step_N
    "resave_latest_written": ("resave", "0"),  # latest names step_N again
    "resave_cleaned": ("resave", "0"),       # step_N.next and the old copy deleted
    "prune_moved": ("save", "0"),            # the first pruned checkpoint renamed to .trash
    "pruned": ("save", "0"),                 # pruning done, before the last barrier
    "rollback_latest": ("rollback", "0"),    # latest names a checkpoint that stays
    "rollback_moved": ("rollback", "0"),     # the first newer checkpoint moved to rolled_back/
}


def tag_for(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step number of a checkpoint directory name ``step_N`` (None for any other name)."""
    m = _STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from a hash of (seed, step, rank).

    Used when the saved per-rank RNG states cannot be given back to their ranks (a resume on another world size).
    """
    value = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


# -- fault injection (tests only) ---------------------------------------------------------------------------------
def _kill() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fault_hook(rank: int, step: int) -> Callable[[str], None]:
    """``hit(point)``: SIGKILLs this process at ``point`` when ``ANIMA_FT_SAVE_FAULT`` asks for it (else a no-op)."""
    spec = os.environ.get(SAVE_FAULT_ENV, "")
    if not spec:
        return lambda point: None
    point, *rest = spec.split(":")
    if point not in FAULT_POINTS or len(rest) > 2:
        raise ValueError(f"{SAVE_FAULT_ENV}={spec!r}: use <point>[:<rank>[:<step>]] with a point of "
                         f"{sorted(FAULT_POINTS)}")
    at_rank = int(rest[0]) if rest and rest[0] else 0
    at_step = int(rest[1]) if len(rest) > 1 else None
    if at_rank != 0 and FAULT_POINTS[point][1] == "0":
        raise ValueError(f"{SAVE_FAULT_ENV}={spec!r}: only rank 0 passes {point!r}; use rank 0")

    def hit(name: str) -> None:
        if name == point and rank == at_rank and at_step in (None, step):
            logger.warning("%s=%s: killing rank %d at save point %r (step %d)", SAVE_FAULT_ENV, spec, rank, name, step)
            _kill()

    return hit


# -- directory helpers ----------------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _latest_name(root: Path) -> str | None:
    latest = root / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_N`` directory under ``root``, by step."""
    if not root.is_dir():
        return []
    found = ((step_of(p.name), p) for p in root.iterdir() if p.is_dir())
    return sorted((s, p) for s, p in found if s is not None)


def _to_trash(path: Path) -> Path:
    """Rename ``path`` to ``path.trash`` (replacing an older one) before deleting it, so that a kill never leaves a
    half-deleted directory under a checkpoint's name; returns the new name."""
    trash = path.with_name(path.name + TRASH)
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    fsync_dir(path.parent)
    return trash


def _clean_leftovers(root: Path) -> None:
    """Remove the temporary directories and files of interrupted saves (never the directory ``latest`` names)."""
    named = _latest_name(root)
    for p in root.iterdir():
        if p.is_dir() and _LEFTOVER.fullmatch(p.name) and step_of(p.name) is None and p.name != named:
            logger.info("removing %s, left by an interrupted save", p)
            shutil.rmtree(p)
        elif p.is_file() and p.name.startswith(LATEST + ".") and p.name.endswith(".tmp"):
            p.unlink()


def _fsync_own_files(ckpt: Path, rank: int) -> None:
    """fsync the files this rank wrote into ``ckpt`` (its ``zero_pp_rank_R`` shards and ``rank_R.pt``; rank 0 also
    the shared ones), so they are durable before ``trainer.json`` marks the checkpoint complete (writing it fsyncs
    the directory)."""
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            m = _RANK_OF_FILE.search(name)
            owner = int(m.group(1) or m.group(2)) if m else 0
            if owner == rank:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())


_warned_copy = False


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst``; where the filesystem refuses, copy and fsync (warned once)."""
    global _warned_copy
    try:
        os.link(src, dst)
    except OSError as exc:
        if not _warned_copy:
            logger.warning("hard links fail in %s (%s): re-saving a step copies its files instead",
                           Path(dst).parent, exc)
            _warned_copy = True
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())


# -- save ---------------------------------------------------------------------------------------------------------
def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint of ``step`` under ``root`` (collective; see the module docstring)."""
    started = time.monotonic()
    _, rank = world_and_rank()
    hit = fault_hook(rank, step)
    tag = tag_for(step)
    partial, final = root / (tag + PARTIAL), root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        hit("save_cleaned")
    _barrier()
    engine.save_checkpoint(str(root), tag=tag + PARTIAL, client_state={"trainer": trainer_state}, save_latest=False)
    hit("shards_written")
    torch.save(rank_state, partial / f"rank_{rank:05d}.pt")
    _fsync_own_files(partial, rank)
    hit("rank_state_written")
    _barrier()  # every rank's files are durable
    if rank == 0:
        write_json_atomic(partial / "trainer.json", trainer_state)
        hit("trainer_json_written")
        if final.exists():
            _publish_resave(root, tag, hit)
        else:
            os.replace(partial, final)
            fsync_dir(root)
            hit("renamed")
            atomic_write_text(root / LATEST, tag)
            hit("latest_written")
        _prune(root, step, keep_last, hit)
        hit("pruned")
    _barrier()
    logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
    return final


def _publish_resave(root: Path, tag: str, hit: Callable[[str], None]) -> None:
    """Replace the existing ``step_N`` by the complete ``step_N.partial``; ``latest`` always names a complete copy."""
    os.replace(root / (tag + PARTIAL), root / (tag + NEXT))
    fsync_dir(root)
    hit("resave_renamed")
    atomic_write_text(root / LATEST, tag + NEXT)
    hit("resave_latest_next")
    _finish_resave(root, tag, hit)


def _finish_resave(root: Path, tag: str, hit: Callable[[str], None]) -> None:
    """``latest`` names the complete ``step_N.next``: give that copy the name ``step_N`` (old copy deleted)."""
    nxt, final, link, trash = (root / (tag + s) for s in (NEXT, "", LINK, TRASH))
    if final.exists():  # the old copy, or a link copy made before a kill: step_N.next is the one to keep
        _to_trash(final)
        hit("resave_old_moved")
    if link.exists():
        shutil.rmtree(link)
    shutil.copytree(nxt, link, copy_function=_link_or_copy)
    for dirpath, _, _ in os.walk(link):
        fsync_dir(dirpath)
    os.replace(link, final)
    fsync_dir(root)
    hit("resave_linked")
    atomic_write_text(root / LATEST, tag)
    hit("resave_latest_written")
    shutil.rmtree(nxt)
    if trash.exists():
        shutil.rmtree(trash)
    hit("resave_cleaned")


def _prune(root: Path, step: int, keep_last: int, hit: Callable[[str], None]) -> None:
    """Delete the checkpoints older than ``step`` except the newest ``keep_last - 1`` (0 = keep all)."""
    if keep_last <= 0:
        return
    older = [(s, p) for s, p in _step_dirs(root) if s < step]
    named = _latest_name(root)
    doomed = [p for _, p in older[:max(0, len(older) - (keep_last - 1))] if p.name != named]
    for i, p in enumerate(doomed):
        trash = _to_trash(p)
        if i == 0:
            hit("prune_moved")
        shutil.rmtree(trash)


# -- start / resume -----------------------------------------------------------------------------------------------
def find_checkpoint(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``resume`` = ``auto`` (``latest`` if any), ``none``, or a directory.

    Read-only; :func:`resolve_resume` settles the run directory first."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer.json").is_file():
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no trainer.json); point "
                             f"it at a step_* directory")
        return path
    name = _latest_name(root)
    if name is None:
        return None
    path = root / name
    if not (path / "trainer.json").is_file():
        raise RuntimeError(f"{root / LATEST} names {name}, which is missing or incomplete; point checkpoint.resume "
                           f"at another step_* directory")
    return path


def resolve_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from (as :func:`find_checkpoint`), after rank 0 settled ``root`` (collective):
    an interrupted re-save is finished, leftovers are removed, and checkpoints newer than the resumed one are moved
    to ``rolled_back/`` (see the module docstring)."""
    _, rank = world_and_rank()
    if rank == 0:
        if root.is_dir():
            named = _latest_name(root)
            if named is not None and named.endswith(NEXT) and (root / named / "trainer.json").is_file():
                logger.warning("%s names %s: finishing the re-save that was interrupted", root / LATEST, named)
                _finish_resave(root, named.removesuffix(NEXT), lambda point: None)
            _clean_leftovers(root)
        _roll_back(root, find_checkpoint(root, resume))
    _barrier()
    return find_checkpoint(root, resume)


def _roll_back(root: Path, ckpt: Path | None) -> None:
    """Move this run's checkpoints newer than ``ckpt`` (step 0 when None) to ``rolled_back/`` (rank 0)."""
    step = int(read_trainer_state(ckpt)["step"]) if ckpt is not None else 0
    hit = fault_hook(0, step)
    inside = ckpt is not None and ckpt.resolve().parent == root.resolve()
    here = _step_dirs(root)
    newer = [p for s, p in here if (s > step or (s == step and not inside)) and not (inside and p.name == ckpt.name)]
    if not newer:
        return
    named = _latest_name(root)
    if inside and named != ckpt.name:
        atomic_write_text(root / LATEST, ckpt.name)
    elif not inside and named in {p.name for p in newer}:
        stays = [p for s, p in here if s < step]
        if stays:
            atomic_write_text(root / LATEST, stays[-1].name)
        else:  # nothing of this run stays: no checkpoint to name until the first save
            (root / LATEST).unlink()
            fsync_dir(root)
    hit("rollback_latest")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = root / ROLLED_BACK / f"{when}_to_{tag_for(step)}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / ROLLED_BACK / f"{when}_to_{tag_for(step)}_{n}"
    logger.warning("resuming %s (step %d): moving this run's newer checkpoints %s to %s (kept, not deleted; resume "
                   "one of them with checkpoint.resume=DIR)", ckpt if ckpt is not None else "from scratch", step,
                   [p.name for p in newer], dest)
    dest.mkdir(parents=True)
    for i, p in enumerate(newer):
        os.replace(p, dest / p.name)
        fsync_dir(root)
        fsync_dir(dest)
        if i == 0:
            hit("rollback_moved")


# -- load ---------------------------------------------------------------------------------------------------------
DAMAGED_FIX = "the checkpoint is damaged; resume from or export another step_* directory"


def read_text_checked(path: Path) -> str:
    """The UTF-8 text of ``path``; FileNotFoundError / ValueError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as text ({exc}); the file is damaged") from exc


def read_trainer_state(ckpt: Path) -> dict:
    """The trainer state (step, stage, samples seen, ...) in ``ckpt/trainer.json``, checked to be a JSON object whose
    counters (``step``, ``samples_seen`` where present) are integers >= 0; anything else is a ValueError naming the
    file."""
    path = ckpt / "trainer.json"
    try:
        state = json.loads(read_text_checked(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {DAMAGED_FIX}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a JSON {type(state).__name__}, not an object; {DAMAGED_FIX}")
    for key in ("step", "samples_seen"):
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: {key!r} is {value!r}, expected an integer >= 0; {DAMAGED_FIX}")
    return state


def load_checkpoint(engine, path: Path) -> dict | None:
    """Load DeepSpeed shards from ``path`` into ``engine``; returns this rank's per-rank state (None if absent)."""
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.is_file():
        logger.warning("%s is missing: RNG and data position are not restored", rank_file)
        return None
    return torch.load(rank_file, weights_only=False)


def read_rank_states(path: Path, world_size: int) -> list[dict]:
    """The per-rank states (RNG, data position) of all ``world_size`` ranks that wrote the checkpoint ``path``."""
    files = [path / f"rank_{r:05d}.pt" for r in range(world_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"{path} lacks the per-rank files {missing[:4]} of its {world_size} ranks; the data "
                           "position cannot be restored on another world size")
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]
