"""An optional local cache of whole remote shards (``data.remote.cache_dir``, size-capped, least recently used out).

The first read of a remote shard starts a background copy of the whole tar into the cache (one copy at a time per
process, streamed to ``NAME.part`` and renamed when complete and of the size the index gives); until it is done,
samples come from ranged GETs. Later reads (later epochs, later runs) open the local copy. Several processes
(loader workers, ranks on one node) share a cache directory: a ``.part`` file marks a copy in progress, so each shard
is copied once. A cached file is named for the URL and the shard index's content (a rewritten shard gets a new
name), and every sample read from it is still checked against the index checksums; a copy that fails them is
deleted and the sample is read from the store again. Eviction removes the least recently used copies (by mtime,
touched on every open) until the new copy fits; a shard larger than the whole cap is never cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from anima_ft.data.object_store import ObjectStore, redact

log = logging.getLogger(__name__)
STALE_PART_S = 3600.0  # a .part file this old belongs to a copy that died


class ShardCache:
    """Whole-shard copies in ``cache_dir`` under ``max_bytes`` (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, max_bytes: int, store: ObjectStore):
        self.dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self.store = store
        self._requested: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def path_for(self, url: str, tag: str) -> Path:
        """Where the copy of ``url`` (whose index content hashes to ``tag``) lives."""
        digest = hashlib.sha256(f"{url}\n{tag}".encode()).hexdigest()[:24]
        return self.dir / f"{digest}-{url.rsplit('/', 1)[-1]}"

    def lookup(self, url: str, tag: str, size: int) -> Path | None:
        """The complete local copy (its use recorded for LRU), or None."""
        path = self.path_for(url, tag)
        try:
            if path.stat().st_size != size:
                return None
            os.utime(path)
        except OSError:
            return None
        return path

    def request(self, url: str, tag: str, size: int) -> None:
        """Start a background copy of the shard unless it is cached, being copied, or larger than the cap."""
        if os.getpid() != self._pid:  # forked: the parent's thread pool does not exist here
            self._pid, self._pool, self._requested = os.getpid(), None, set()
        if url in self._requested or size > self.max_bytes:
            return
        self._requested.add(url)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-cache")
        self._pool.submit(self._copy, url, tag, size)

    def drop(self, url: str, tag: str) -> None:
        """Delete a copy that failed its checksums (the next reads go to the store)."""
        self.path_for(url, tag).unlink(missing_ok=True)
        log.warning("shard cache: removed the copy of %s, it does not match its index checksums", redact(url))

    def _copy(self, url: str, tag: str, size: int) -> None:
        final = self.path_for(url, tag)
        part = final.with_name(final.name + ".part")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if final.exists():
                return
            try:
                os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                if time.time() - part.stat().st_mtime < STALE_PART_S:
                    return  # another process is copying it
                part.unlink(missing_ok=True)
                os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            self._evict(size)
            self.store.get_file(url, str(part), size)
            os.replace(part, final)
            self.store.counters.add(cache_fills=1)
        except Exception as err:  # a failed copy only costs speed: reads keep going to the store
            part.unlink(missing_ok=True)
            log.warning("shard cache: copying %s failed (%s: %s); its samples are read from the store",
                        redact(url), type(err).__name__, redact(err))

    def _evict(self, need: int) -> None:
        entries = []
        for p in self.dir.iterdir():
            if p.name.endswith(".part"):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: (e[0], e[2].name)):
            if total + need <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            log.info("shard cache: evicted %s (%d bytes) to stay under %d bytes", p.name, size, self.max_bytes)

    def close(self, wait: bool = False) -> None:
        """Stop taking copies; ``wait`` also waits for the one in progress (tests)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
            self._pool = None
