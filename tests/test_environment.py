"""The process environment the project sets up for its ranks: DeepSpeed's CPU ops build into the venv, and a stale
build lock (left by a build that was killed) is reported with its path and the fix instead of hanging every start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from anima_ft.train.distributed import (
    LOCK_GRACE_S,
    STALE_LOCK_AGE_S,
    check_extension_locks,
    use_env_extensions_dir,
)


def _lock(root, age_s: float):
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_extensions_build_into_the_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert use_env_extensions_dir() == __import__("pathlib").Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")  # a user's choice is kept
    assert str(use_env_extensions_dir()) == "/somewhere/else"


def test_lock_of_a_killed_build_is_reported_with_the_fix(tmp_path):
    lock = _lock(tmp_path, age_s=LOCK_GRACE_S + 60)  # nobody holds it open: its build was killed
    with pytest.raises(RuntimeError) as err:
        check_extension_locks(tmp_path)
    msg = str(err.value)
    assert str(lock) in msg and "no process holds it open" in msg and f"rm {lock}" in msg


def test_lock_of_a_running_build_is_left_alone_until_too_old(tmp_path):
    lock = _lock(tmp_path, age_s=60)
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(lock)!r}); import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 20  # until the holder has the file open
        while not any(os.path.realpath(f"/proc/{holder.pid}/fd/{fd}") == str(lock)
                      for fd in os.listdir(f"/proc/{holder.pid}/fd")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        check_extension_locks(tmp_path)  # a build holds it: not stale
        old = time.time() - STALE_LOCK_AGE_S - 60
        os.utime(lock, (old, old))
        with pytest.raises(RuntimeError, match=f"held by pids \\[{holder.pid}\\]"):
            check_extension_locks(tmp_path)  # held, but older than any build takes
    finally:
        holder.kill()
        holder.wait()


def test_fresh_unheld_lock_is_not_judged(tmp_path):
    _lock(tmp_path, age_s=0)  # between a build's close() and its remove(): too young to judge
    check_extension_locks(tmp_path)
    check_extension_locks(tmp_path / "missing")  # no build directory yet
