"""Named shard sources: discovery, index loading, validation and random-access sample reading.

Every rank and every loader worker builds the same :class:`Catalog` from the shard indices (no communication), so
sample ids, buckets and the set of valid samples agree everywhere. Validation levels:

* ``"index"`` (default, cheap): the whole index schema (``index_schema.py``), format version, fingerprint, file
  size against the index (samples past the end of a truncated tar are skipped as ``truncated``), required members
  present in the index entry. A shard whose index is missing, unreadable or breaks the schema, or whose tar is
  missing, is skipped and counted once as ``unreadable_shard`` (the log names the shard and the field).
* ``"full"``: additionally reads, verifies and decodes every sample once at start (checksums, shapes, dtypes,
  finiteness, tar headers). Use it on small or suspect data; with ``"index"`` such problems are found when a sample
  is read (checksums are verified on every read), and the loader replaces it by the next valid sample of the same
  source and bucket (see ``mixer.py``).
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from anima_ft.config.remote import RemoteConfig
from anima_ft.data.index_schema import BadIndex, entry_problem, fingerprint_hash
from anima_ft.data.object_store import GLOB_CHARS, ObjectStore, RemoteReadError, is_url, redact
from anima_ft.data.prefetch import SpanPrefetcher
from anima_ft.data.shard_cache import ShardCache
from anima_ft.data.shard_format import (
    MEMBERS,
    SampleError,
    decode_owned,
    decode_span,
    index_path_for,
    parse_index,
    read_index,
    read_sample,
)

log = logging.getLogger(__name__)
Bucket = tuple[int, int]
VALIDATE_LEVELS = ("index", "full")


@dataclass
class SourceSpec:
    """One named data source.

    name: label that appears in each batch's ``source`` list and in ``stats()`` (e.g. "target", "replay").
    shards: a directory (every ``*.tar`` in it), a glob, or a list of tar paths; each tar needs its ``.index.json``.
        Any of them may be a URL read through fsspec (``s3://bucket/shards/``, ``s3://bucket/*.tar``,
        ``gs://...``, ``https://host/NAME.tar``; see ``object_store.py``).
    weight: relative share of every global batch (normalized over all sources; 0 = off until ``set_weights``).
    """

    name: str
    shards: str | list[str]
    weight: float = 1.0


def _discover_remote(pattern: str, store: ObjectStore) -> set[str]:
    if pattern.endswith(".tar") and not any(c in pattern for c in GLOB_CHARS):
        return {pattern}
    try:
        listed = store.glob(pattern)
    except FileNotFoundError:
        return set()
    except RemoteReadError as err:
        raise RuntimeError(f"cannot list {redact(pattern)} ({err}); check the store and run again") from err
    found = {u for u in listed if u.endswith(".tar")}
    if not any(c in pattern for c in GLOB_CHARS):  # a "directory": a lost tar is named by its index
        found.update(u[: -len(".index.json")] + ".tar" for u in listed if u.endswith(".index.json"))
    return found


def discover_shards(spec: SourceSpec, store: ObjectStore | None = None) -> list[Path | str]:
    """The sorted tar paths a source names (``Path`` on disk, ``str`` for URLs); ``ValueError`` when there are none.

    In a directory, an index whose tar is missing names its tar too, so the lost shard is counted, not ignored.
    """
    patterns = [spec.shards] if isinstance(spec.shards, (str, os.PathLike)) else list(spec.shards)
    paths: set[Path | str] = set()
    for pattern in patterns:
        if is_url(pattern):
            paths.update(_discover_remote(str(pattern), store or ObjectStore()))
            continue
        p = Path(pattern)
        if p.is_dir():
            paths.update(p.glob("*.tar"))
            paths.update(i.with_name(i.name[: -len(".index.json")] + ".tar") for i in p.glob("*.index.json"))
        elif p.suffix == ".tar" and p.exists():
            paths.add(p)
        else:
            paths.update(Path(m) for m in glob.glob(str(pattern)) if m.endswith(".tar"))
    if not paths:
        raise ValueError(f"source {spec.name!r}: no .tar shards found at {redact(spec.shards)}; pass a directory, a "
                         "glob or a list of shard paths (or URLs) written by `anima-ft prepare`")
    return sorted(paths, key=str)


COLUMNS = ("shard", "source", "span_start", "span_end", "width", "height", "qwen_len", "t5_len",
           *(f"{m}_{part}" for m in MEMBERS for part in ("offset", "size", "checksum")))
_U64 = 2**64


def _checksum_int(hex_digest: str) -> int:
    """A 16-hex-digit checksum as a signed int64 (the table's dtype)."""
    value = int(hex_digest, 16)
    return value - _U64 if value >= 2**63 else value


@dataclass
class Catalog:
    """All valid samples of all sources, with per-(source, bucket) sample-id lists.

    Sample i is row i of ``table`` (int64 columns ``COLUMNS``: about 140 bytes a sample, so millions of samples
    fit in every rank and worker) plus ``keys[i]``; :meth:`entry` rebuilds its shard-index entry on demand.
    by_bucket[s][bucket]: sorted sample ids of source s in that bucket.
    checksummed[k]: shard k's index has member checksums (format v2); v1 shards' checksum columns hold 0.
    bad_shards: ``(shard path, field, detail)`` of every shard skipped as ``unreadable_shard``.
    shard_bytes[k] / shard_tags[k]: shard k's tar size and the xxh3 of its index bytes (names its cached copy).
    build_io: remote I/O counts of building the catalog (``object_store.IOCounters``).
    """

    names: list[str]
    shard_paths: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    by_bucket: list[dict[Bucket, list[int]]] = field(default_factory=list)
    qwen_dim: int = 0
    fingerprint: dict = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    checksummed: list[bool] = field(default_factory=list)
    bad_shards: list[tuple[str, str, str]] = field(default_factory=list)
    shard_bytes: list[int] = field(default_factory=list)
    shard_tags: list[str] = field(default_factory=list)
    build_io: dict = field(default_factory=dict)
    table: np.ndarray = field(default_factory=lambda: np.zeros((0, len(COLUMNS)), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def entry(self, i: int) -> dict:
        """Sample i as a shard-index entry (``key``, ``bucket``, ``span``, ``members``...) plus shard and source."""
        row = dict(zip(COLUMNS, self.table[i].tolist()))
        members = {m: [row[f"{m}_offset"], row[f"{m}_size"]] for m in MEMBERS}
        checksums = ({m: f"{row[f'{m}_checksum'] % _U64:016x}" for m in MEMBERS}
                     if self.checksummed[row["shard"]] else None)
        return {"key": self.keys[i], "shard": row["shard"], "source": row["source"], "members": members,
                "checksums": checksums, "span": [row["span_start"], row["span_end"]],
                "bucket": [row["width"], row["height"]], "qwen_len": row["qwen_len"], "t5_len": row["t5_len"]}


def _row(entry: dict) -> list[int]:
    sums = entry.get("checksums")
    members = [v for m in MEMBERS for v in (*entry["members"][m], _checksum_int(sums[m]) if sums else 0)]
    return [entry["shard"], entry["source"], *entry["span"], *entry["bucket"], entry["qwen_len"], entry["t5_len"],
            *members]


def _check_fingerprint(path: Path, index: dict, ref: tuple[Path, dict] | None, expected) -> None:
    if expected is not None:
        want = expected if isinstance(expected, str) else fingerprint_hash(expected)
        if index["fingerprint_hash"] != want:
            raise ValueError(f"shard {path} was encoded with fingerprint {index['fingerprint_hash'][:12]} "
                             f"({index['fingerprint']}), but expected_fingerprint is {want[:12]}: re-encode it "
                             "with the same VAE / text encoder, or drop expected_fingerprint")
    if ref is not None and index["fingerprint_hash"] != ref[1]["fingerprint_hash"]:
        a, b = ref[1]["fingerprint"], index["fingerprint"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"shards {ref[0]} and {path} were made with different encoder settings (differing: "
                         f"{diff}); mixing them would be silent garbage: re-encode one of them with `anima-ft prepare`")


def open_remote_shard(url: str, store: ObjectStore) -> tuple[dict, int, str]:
    """``(checked index, tar size, index tag)`` of a shard in object storage: its index fetched once, its size from
    one HEAD. ``BadIndex`` for a missing or bad index or a missing tar; other errors are the store's."""
    ipath = index_path_for(url)
    try:
        raw = store.read_bytes(ipath)
    except FileNotFoundError:
        raise BadIndex(redact(ipath), "(file)", f"shard {redact(url)} has no index: only shards written by "
                       "`anima-ft prepare` can be streamed") from None
    index = parse_index(raw, redact(ipath))
    try:
        size = store.size(url)
    except FileNotFoundError:
        raise BadIndex(redact(ipath), "(file)", f"its tar {url.rsplit('/', 1)[-1]} is missing") from None
    return index, size, xxhash.xxh3_64_hexdigest(raw)


def _open_local(path: Path) -> tuple[dict, int, str]:
    index = read_index(path)
    if not path.exists():
        raise BadIndex(index_path_for(path), "(file)", f"its tar {path.name} is missing")
    return index, path.stat().st_size, ""


def _fetch_remote_shards(paths: list[Path | str], store: ObjectStore) -> dict[str, object]:
    """Every remote shard's ``open_remote_shard`` result (or its ``BadIndex``), fetched concurrently.

    A shard that cannot be read for any other reason (retries exhausted, access denied) stops the build with a
    RuntimeError naming it: every rank must build the same catalog, so a transient failure never drops a shard.
    """
    urls = [str(p) for p in paths if is_url(p)]
    opened = dict(zip(urls, store.read_many(urls, lambda u: open_remote_shard(u, store))))
    for url, got in opened.items():
        if isinstance(got, Exception) and not isinstance(got, BadIndex):
            raise RuntimeError(f"cannot read shard {redact(url)} or its index ({type(got).__name__}: {redact(got)}); "
                               "no shard is skipped for a storage error, so that every rank sees the same data: "
                               "check the store and run again") from got
    return opened


def _open_index(path: Path | str, cat: Catalog, remote: dict[str, object]) -> tuple[dict, int, str]:
    """``(index, size, tag)`` of one shard, or ``BadIndex`` (missing tar, bad index, qwen width unlike the others)."""
    if is_url(path):
        got = remote[str(path)]
        if isinstance(got, BadIndex):
            raise got
        index, size, tag = got
    else:
        index, size, tag = _open_local(path)
    if index["num_samples"] and cat.qwen_dim and index["qwen_dim"] != cat.qwen_dim:
        raise BadIndex(redact(index_path_for(path)), "qwen_dim", f"{index['qwen_dim']}, but the other shards "
                       f"with the same encoder fingerprint have {cat.qwen_dim}")
    return index, size, tag


def build_catalog(specs: list[SourceSpec], expected_fingerprint=None, validate: str = "index",
                  remote: RemoteConfig | None = None) -> Catalog:
    """Load every source's shard indices, check compatibility, and list the valid samples per bucket.

    A bad shard is skipped and counted (``unreadable_shard``, see the module docstring); a source left with no
    valid sample is a ``ValueError`` naming its skipped shards and the offending fields. Remote shards' indices are
    fetched once each, concurrently; ``remote`` holds the retry and prefetch settings.
    """
    if validate not in VALIDATE_LEVELS:
        raise ValueError(f"validate={validate!r}; choose one of {VALIDATE_LEVELS}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"source names {names} must be non-empty and unique")
    cat = Catalog(names, by_bucket=[{} for _ in specs])
    rows: list[list[int]] = []
    ref: tuple[Path | str, dict] | None = None
    reader = ShardReader(cat, remote=remote)
    store = reader.store
    found = [discover_shards(spec, store) for spec in specs]
    fetched = _fetch_remote_shards([p for paths in found for p in paths], store)
    v1_shards = 0
    for s, spec in enumerate(specs):
        for path in found[s]:
            try:
                index, size, tag = _open_index(path, cat, fetched)
            except BadIndex as err:
                cat.skipped["unreadable_shard"] += 1
                cat.bad_shards.append((err.path, err.field, err.detail))
                log.warning("skipping shard %s (unreadable_shard, field %s): %s", redact(path), err.field, err.detail)
                continue
            _check_fingerprint(redact(path), index, ref, expected_fingerprint)
            if ref is None:
                ref, cat.fingerprint = (redact(path), index), index["fingerprint"]
            cat.qwen_dim = cat.qwen_dim or index["qwen_dim"] or 0
            if size > index["tar_bytes"]:
                log.warning("shard %s has %d bytes, %d more than its index says: its samples are still verified "
                            "one by one", redact(path), size, size - index["tar_bytes"])
            v1_shards += index["format_version"] == 1
            shard_id = len(cat.shard_paths)
            cat.shard_paths.append(str(path))
            cat.checksummed.append(index["format_version"] >= 2)
            cat.shard_bytes.append(size)
            cat.shard_tags.append(tag)
            entries = []
            for entry in index["samples"]:
                entry = {**entry, "shard": shard_id, "source": s}
                reason = entry_problem(entry, size)
                entries.append((entry, reason))
            if validate == "full":
                reader.schedule_entries([e for e, reason in entries if reason is None])
            for entry, reason in entries:
                if reason is None and validate == "full":
                    try:
                        reader.read_entry(entry)
                    except SampleError as err:
                        reason = (err.reason, str(err))
                if reason is not None:
                    cat.skipped[reason[0]] += 1
                    log.warning("skipping sample %s in shard %s: %s", entry["key"], redact(path), reason[1])
                    continue
                cat.by_bucket[s].setdefault(tuple(entry["bucket"]), []).append(len(cat.keys))
                cat.keys.append(entry["key"])
                rows.append(_row(entry))
        if not cat.by_bucket[s]:
            bad = "; ".join(f"{p} (field {f}: {d})" for p, f, d in cat.bad_shards[:5])
            raise ValueError(f"source {spec.name!r} has no valid sample in {redact(spec.shards)} (skipped so far: "
                             f"{dict(cat.skipped)}{'; unreadable shards: ' + bad if bad else ''}); check the "
                             "shards with `anima-ft verify` or re-run prepare")
    reader.close()
    cat.build_io = reader.io_delta()
    if v1_shards:
        log.warning("%d of %d shards are format v1, without member checksums: bit flips in their tensors or captions "
                    "cannot be detected; re-run `anima-ft prepare` to get checksummed (v2) shards", v1_shards,
                    len(cat.shard_paths))
    cat.table = np.asarray(rows, dtype=np.int64).reshape(len(rows), len(COLUMNS))
    return cat


DECODE_THREADS = 0  # per reader: threads checking and decoding remote samples beside the consumer's (0: in it)


class ShardReader:
    """Random-access sample reader over a catalog's shards (one per loader worker).

    Local shards: a few files kept open, one seek per sample. Remote shards (URLs): ranged GETs of each sample's
    span through a :class:`~anima_ft.data.prefetch.SpanPrefetcher` of ``remote.prefetch_samples`` (call
    :meth:`schedule` with the sample ids about to be read, in order), and the local shard cache when
    ``remote.cache_dir`` is set. Both paths verify the member checksums and decode the same way (``decode_span``).
    """

    def __init__(self, catalog: Catalog, max_open: int = 16, remote: RemoteConfig | None = None):
        self.catalog = catalog
        self.max_open = max_open
        self.remote = remote or RemoteConfig()
        self.store = ObjectStore(self.remote)
        self._files: OrderedDict[object, object] = OrderedDict()
        self._prefetch: SpanPrefetcher | None = None
        self._remote: list[bool] = []  # per shard: named by URL (shards are only ever appended to a catalog)
        self._cache = (ShardCache(self.remote.cache_dir, int(self.remote.cache_max_gb * 2**30), self.store)
                       if self.remote.cache_dir else None)

    def _file(self, key: object, path: str | Path):
        f = self._files.pop(key, None)
        if f is None:
            f = open(path, "rb")
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files[key] = f
        return f

    def _fetch(self, shard: int, start: int, end: int) -> bytes:
        return self.store.read_range(self.catalog.shard_paths[shard], start, end)

    def _submit(self, spans: list[tuple[int, int, int]]) -> list:
        return self.store.submit_ranges([(self.catalog.shard_paths[k], a, b) for k, a, b in spans])

    def _decode(self, span: tuple[int, int, int], entry: dict | int, data: bytes | bytearray) -> dict:
        """A remote sample's bytes checked and decoded (in a decode thread); ``entry`` may be its sample id. A
        ``bytearray`` is the private buffer of one request (``ObjectStore.range_coroutine``) or a slice of one,
        handed over by the prefetcher, so it is decoded in place; ``bytes`` are copied once."""
        entry = self.catalog.entry(entry) if isinstance(entry, int) else entry
        decode = decode_owned if type(data) is bytearray else decode_span
        return decode(data, entry, self.catalog.qwen_dim)

    @property
    def prefetcher(self) -> SpanPrefetcher:
        """The span prefetcher (made on first use, in the process that reads): requests as coroutines on the
        process's remote I/O loop, which the reading thread runs itself while it waits for a sample
        (``ObjectStore.wait``); checksums and decoding in the reading thread (or in ``DECODE_THREADS`` threads as
        the bytes arrive)."""
        if self._prefetch is None:
            self._prefetch = SpanPrefetcher(self._fetch, self.remote.prefetch_samples, submit=self._submit,
                                            decode=self._decode, decode_threads=DECODE_THREADS,
                                            wait=self.store.wait,
                                            in_flight=self.remote.requests_at_once)
        return self._prefetch

    def is_remote(self, shard: int) -> bool:
        """Whether shard ``shard`` is read from object storage."""
        paths = self.catalog.shard_paths
        if shard >= len(self._remote):  # the catalog grows while build_catalog validates with this reader
            self._remote.extend(is_url(p) for p in paths[len(self._remote):])
        return self._remote[shard]

    def schedule_entries(self, entries: list[dict]) -> None:
        """Start fetching (and decoding) these entries' spans (remote shards only), to be read in this order."""
        entries = [e for e in entries if self.is_remote(e["shard"])]
        if entries:
            self.prefetcher.schedule([(e["shard"], *e["span"]) for e in entries], entries)

    def schedule(self, sample_ids: list[int]) -> None:
        """Start fetching (and decoding) these catalog samples (remote shards only), to be read in this order."""
        table = self.catalog.table
        shard_col, start_col, end_col = (COLUMNS.index(c) for c in ("shard", "span_start", "span_end"))
        rows = [(int(table[i, shard_col]), int(table[i, start_col]), int(table[i, end_col]), int(i))
                for i in sample_ids]
        rows = [r for r in rows if self.is_remote(r[0])]
        if rows:  # tagged with the sample id: its index entry is rebuilt in the decode thread
            self.prefetcher.schedule([r[:3] for r in rows], [r[3] for r in rows])

    @property
    def scheduled(self) -> int:
        """Remote spans scheduled and not yet read."""
        return self._prefetch.scheduled if self._prefetch is not None else 0

    def read_entry(self, entry: dict) -> dict:
        """Decode one sample (see ``shard_format.decode_members``); raises ``SampleError``."""
        shard = entry["shard"]
        if not self.is_remote(shard):
            try:
                f = self._file(shard, self.catalog.shard_paths[shard])
            except OSError as err:  # deleted or unreadable since the catalog was built
                raise SampleError("unreadable_shard", str(err)) from err
            return read_sample(f, entry, self.catalog.qwen_dim)
        span = (shard, *entry["span"])
        if self._cache is not None:
            prefetched = self._prefetch is not None and self._prefetch.is_next(span)
            sample = self._read_cached(entry, copy_only=prefetched)
            if sample is not None:
                return sample
        try:
            return self.prefetcher.take(*span, tag=entry)  # checked and decoded by _decode
        except RemoteReadError as err:
            raise SampleError("remote_read_failed", str(err)) from err
        except (FileNotFoundError, PermissionError) as err:
            raise SampleError("unreadable_shard", redact(err)) from err

    def _read_cached(self, entry: dict, copy_only: bool = False) -> dict | None:
        """The sample from the shard's local copy; None (and a copy started) when there is none yet, or when
        ``copy_only`` (its bytes are already being prefetched)."""
        shard = entry["shard"]
        url, tag, size = self.catalog.shard_paths[shard], self.catalog.shard_tags[shard], self.catalog.shard_bytes[shard]
        path = self._cache.lookup(url, tag, size)
        if path is None:
            self._cache.request(url, tag, size)
            return None
        if copy_only:
            return None
        try:
            sample = read_sample(self._file(("cache", shard), path), entry, self.catalog.qwen_dim)
        except (OSError, SampleError) as err:
            if isinstance(err, SampleError) and err.reason not in ("checksum_mismatch", "corrupt_member", "truncated"):
                raise
            stale = self._files.pop(("cache", shard), None)
            if stale is not None:
                stale.close()
            self._cache.drop(url, tag)
            return None
        self.store.counters.add(cache_hits=1)
        return sample

    def read(self, sample_id: int) -> dict:
        """Decode catalog sample ``sample_id``; raises ``SampleError``."""
        return self.read_entry(self.catalog.entry(sample_id))

    def io_delta(self) -> dict[str, int]:
        """Remote I/O counts since the last call (``object_store.IOCounters``)."""
        return self.store.counters.delta()

    def close(self) -> None:
        """Close every open shard file and stop prefetching."""
        while self._files:
            self._files.popitem()[1].close()
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        if self._cache is not None:
            self._cache.close()
