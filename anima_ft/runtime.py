"""Runtime helpers shared by every package: durable atomic writes, this process's rank, a free port, returning freed
heap memory to the OS.

This module sits below every other ``anima_ft`` package (see docs/architecture.md): it imports nothing of the
project, so data, model, train, eval and distill may all use it.

Atomic writes go to a temporary name in the same directory (holding the pid, so ranks writing the same file at the
same time never share one), are flushed and fsync'd, then ``os.replace``'d over the target, and the directory is
fsync'd so the rename itself survives a power loss. A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike) -> Path:
    """The temporary sibling an atomic write of ``path`` goes through (pid-suffixed)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(fileobj)`` fills a temporary sibling, then fsync and rename."""

    def save(name: str) -> None:
        with open(name, "wb") as f:
            write(f)

    atomic_save_with(path, save)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically and durably."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def atomic_save_with(path: str | os.PathLike, save: Callable[[str], None]) -> None:
    """Atomic write for libraries that take a file name (``safetensors.torch.save_file``): ``save(tmp_name)``."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        save(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def world_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def free_port() -> int:
    """A free TCP port on localhost (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIBC = None


def release_freed_memory() -> None:
    """Hand memory that was freed but kept by the C allocator back to the OS (glibc ``malloc_trim``; a no-op where
    there is none). Code that allocates and frees many large tensors of mixed sizes (one model block after another)
    calls it between pieces: glibc serves tensors under its mmap threshold from a heap that fragments, and without
    a trim the resident size grows with every piece (measured at full size: +67 MB per DiT block when writing a
    random 2B model, 2.9 GB peak instead of 0.9 GB; docs/full_size_cpu.md)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)
