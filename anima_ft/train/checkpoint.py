"""Sharded training checkpoints: DeepSpeed model/optimizer shards + trainer state + per-rank state.

Layout of ``RUN/checkpoints``::

    step_00000200/            one complete checkpoint (DeepSpeed shards, trainer.json, rank_00000.pt, ...)
    step_00000300.partial/    being written (or abandoned by a crash: never read, removed on the next save)
    latest                    text file naming the newest complete checkpoint

A checkpoint counts only when every rank finished writing: all ranks write into ``step_N.partial``, meet at a
barrier, then global rank 0 renames it to ``step_N`` and only then replaces ``latest`` (write-then-rename).
Per-rank files hold that rank's RNG states and data-stream position. A resume on another world size adds
``step_N/universal/`` (``reshard.py``) and reads every saved rank's data position (:func:`read_rank_states`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from anima_ft.runtime import atomic_write_text

logger = logging.getLogger(__name__)
PARTIAL = ".partial"


def tag_for(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


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


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint of ``step`` under ``root`` (collective; see the module docstring)."""
    rank = dist.get_rank()
    tag = tag_for(step)
    partial = root / (tag + PARTIAL)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag + PARTIAL, client_state={"trainer": trainer_state}, save_latest=False)
    torch.save(rank_state, partial / f"rank_{rank:05d}.pt")
    dist.barrier()  # every rank finished writing
    final = root / tag
    if rank == 0:
        (partial / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / "latest", tag)
        _prune(root, keep_last)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL))
    for p in root.glob("step_*" + PARTIAL):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in done[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``resume`` = ``auto`` (``latest`` if any), ``none``, or a directory."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer.json").is_file():
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no trainer.json)")
        return path
    latest = root / "latest"
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise RuntimeError(f"{latest} names {path.name}, which is missing or incomplete; point checkpoint.resume "
                           f"at another step_* directory")
    return path


def read_trainer_state(path: Path) -> dict:
    """The trainer state (step, stage, samples seen, ...) stored in a checkpoint."""
    return json.loads((path / "trainer.json").read_text())


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
