"""``prepare --out s3://bucket/shards``: finished shards are written locally, then uploaded, the index last.

A shard is finished in the store when its ``NAME.index.json`` exists there, exactly as on disk: the tar is uploaded
first (and its stored size checked), the index only after it, so a crash at any point leaves at most a tar
without an index, which readers never list as a finished shard (it is counted as ``unreadable_shard`` if named) and
which a re-run writes again. Uploads use the loader's retry policy (``object_store.py``); credentials come from
the storage library's environment, never from the command line.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from anima_ft.data.object_store import ObjectStore, redact
from anima_ft.data.shard_format import index_path_for

log = logging.getLogger(__name__)


class RemoteOutput:
    """The remote ``--out`` of one prepare process and its local staging directory (removed by :meth:`close`)."""

    def __init__(self, url: str, staging_dir: str = "", store: ObjectStore | None = None):
        self.url = url.rstrip("/")
        self.store = store or ObjectStore()
        self._own_staging = not staging_dir
        self.staging = Path(staging_dir or tempfile.mkdtemp(prefix="anima_ft_prepare_"))
        self.staging.mkdir(parents=True, exist_ok=True)

    def url_for(self, name: str) -> str:
        """The URL of a file in the output."""
        return f"{self.url}/{name}"

    def finished_index(self, unit: str) -> dict | None:
        """The index of shard ``unit`` when it is finished in the store, else None."""
        try:
            raw = self.store.read_bytes(str(index_path_for(self.url_for(f"{unit}.tar"))))
        except FileNotFoundError:
            return None
        return json.loads(raw.decode("utf-8"))

    def publish(self, tar_path: Path) -> None:
        """Upload a committed local shard, tar first, index last; then remove the local copy."""
        index_path = Path(index_path_for(tar_path))
        tar_url = self.url_for(tar_path.name)
        self.store.put_file(str(tar_path), tar_url)
        self.store.put_file(str(index_path), self.url_for(index_path.name))
        tar_path.unlink()
        index_path.unlink()
        log.info("uploaded %s", redact(tar_url))

    def indices(self) -> list[dict]:
        """Every finished shard index in the output (fetched concurrently)."""
        urls = [u for u in self.store.glob(self.url + "/") if u.endswith(".index.json")]
        got = self.store.read_many(urls, self.store.read_bytes)
        for url, raw in zip(urls, got):
            if isinstance(raw, Exception):
                raise RuntimeError(f"cannot read {redact(url)} for the prepare summary ({type(raw).__name__}: "
                                   f"{redact(raw)})") from raw
        return [json.loads(raw.decode("utf-8")) for raw in got]

    def put_json(self, name: str, data: dict) -> None:
        """Upload ``data`` as ``name`` (JSON)."""
        local = self.staging / name
        local.write_text(json.dumps(data, indent=1, sort_keys=True))
        self.store.put_file(str(local), self.url_for(name))
        local.unlink()

    def close(self) -> None:
        """Remove the staging directory when this object made it."""
        if self._own_staging:
            shutil.rmtree(self.staging, ignore_errors=True)
