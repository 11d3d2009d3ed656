"""Checks of the paths a config names, run by ``validate`` before any rank works (standard library only: the config
layer imports nothing above it, see docs/architecture.md).

* ``model.init_path`` / ``model.adapter_path``: exist as files;
* ``data.sources.*.shards`` items and ``eval.sets.*.path``: each names something on disk (a file, a directory, or a
  glob that matches at least one path); an empty pattern is an error.

Whether those files hold what the run needs (a safetensors header of an Anima model, shard indexes whose latents and
Qwen width fit the model) needs the model and data packages, so it is checked above this layer.
"""

from __future__ import annotations

import glob
from pathlib import Path

from .schema import Config


def _check_pattern(key: str, pattern: str) -> None:
    if not str(pattern).strip():
        raise ValueError(f"{key}={pattern!r} is empty; give a shard directory, glob or .tar path")
    if "://" in str(pattern):  # a URL: data/preflight.py checks remote shards through the object store
        return
    if not (Path(pattern).exists() or glob.glob(str(pattern))):
        raise ValueError(f"{key}={pattern!r} matches nothing on disk; give a directory, glob or .tar path of shards "
                         "written by `anima-ft prepare`")


def check_paths(cfg: Config) -> None:
    """Raise ValueError naming the key for a model file that does not exist or a shard pattern that matches nothing."""
    for key in ("init_path", "adapter_path"):
        p = getattr(cfg.model, key)
        if p and not Path(p).is_file():
            raise ValueError(f"model.{key}={p!r} does not exist; give the official Anima safetensors path")
    for i, s in enumerate(cfg.data.sources):
        for j, pattern in enumerate(s.shards):
            _check_pattern(f"data.sources.{i}.shards.{j}", pattern)
    for i, s in enumerate(cfg.eval.sets):
        _check_pattern(f"eval.sets.{i}.path", s.path)
