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

from anima_ft.data.index_schema import BadIndex, entry_problem, fingerprint_hash
from anima_ft.data.shard_format import MEMBERS, SampleError, index_path_for, read_index, read_sample

log = logging.getLogger(__name__)
Bucket = tuple[int, int]
VALIDATE_LEVELS = ("index", "full")


@dataclass
class SourceSpec:
    """One named data source.

    name: label that appears in each batch's ``source`` list and in ``stats()`` (e.g. "target", "replay").
    shards: a directory (every ``*.tar`` in it), a glob, or a list of tar paths; each tar needs its ``.index.json``.
    weight: relative share of every global batch (normalized over all sources; 0 = off until ``set_weights``).
    """

    name: str
    shards: str | list[str]
    weight: float = 1.0


def discover_shards(spec: SourceSpec) -> list[Path]:
    """The sorted tar paths a source names; ``ValueError`` when there are none.

    In a directory, an index whose tar is missing names its tar too, so the lost shard is counted, not ignored.
    """
    patterns = [spec.shards] if isinstance(spec.shards, (str, os.PathLike)) else list(spec.shards)
    paths: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths.update(p.glob("*.tar"))
            paths.update(i.with_name(i.name[: -len(".index.json")] + ".tar") for i in p.glob("*.index.json"))
        elif p.suffix == ".tar" and p.exists():
            paths.add(p)
        else:
            paths.update(Path(m) for m in glob.glob(str(pattern)) if m.endswith(".tar"))
    if not paths:
        raise ValueError(f"source {spec.name!r}: no .tar shards found at {spec.shards!r}; pass a directory, a glob "
                         "or a list of shard paths written by `anima-ft prepare`")
    return sorted(paths)


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


def _open_index(path: Path, cat: Catalog) -> dict:
    """The checked index of one shard, or ``BadIndex`` (missing tar, bad index, qwen width unlike the others)."""
    index = read_index(path)
    if not path.exists():
        raise BadIndex(index_path_for(path), "(file)", f"its tar {path.name} is missing")
    if index["num_samples"] and cat.qwen_dim and index["qwen_dim"] != cat.qwen_dim:
        raise BadIndex(index_path_for(path), "qwen_dim", f"{index['qwen_dim']}, but the other shards with the "
                       f"same encoder fingerprint have {cat.qwen_dim}")
    return index


def build_catalog(specs: list[SourceSpec], expected_fingerprint=None, validate: str = "index") -> Catalog:
    """Load every source's shard indices, check compatibility, and list the valid samples per bucket.

    A bad shard is skipped and counted (``unreadable_shard``, see the module docstring); a source left with no
    valid sample is a ``ValueError`` naming its skipped shards and the offending fields.
    """
    if validate not in VALIDATE_LEVELS:
        raise ValueError(f"validate={validate!r}; choose one of {VALIDATE_LEVELS}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"source names {names} must be non-empty and unique")
    cat = Catalog(names, by_bucket=[{} for _ in specs])
    rows: list[list[int]] = []
    ref: tuple[Path, dict] | None = None
    reader = ShardReader(cat)
    v1_shards = 0
    for s, spec in enumerate(specs):
        for path in discover_shards(spec):
            try:
                index = _open_index(path, cat)
            except BadIndex as err:
                cat.skipped["unreadable_shard"] += 1
                cat.bad_shards.append((err.path, err.field, err.detail))
                log.warning("skipping shard %s (unreadable_shard, field %s): %s", path, err.field, err.detail)
                continue
            _check_fingerprint(path, index, ref, expected_fingerprint)
            if ref is None:
                ref, cat.fingerprint = (path, index), index["fingerprint"]
            cat.qwen_dim = cat.qwen_dim or index["qwen_dim"] or 0
            size = path.stat().st_size
            if size > index["tar_bytes"]:
                log.warning("shard %s has %d bytes, %d more than its index says: its samples are still verified "
                            "one by one", path, size, size - index["tar_bytes"])
            v1_shards += index["format_version"] == 1
            shard_id = len(cat.shard_paths)
            cat.shard_paths.append(str(path))
            cat.checksummed.append(index["format_version"] >= 2)
            for entry in index["samples"]:
                entry = {**entry, "shard": shard_id, "source": s}
                reason = entry_problem(entry, size)
                if reason is None and validate == "full":
                    try:
                        reader.read_entry(entry)
                    except SampleError as err:
                        reason = (err.reason, str(err))
                if reason is not None:
                    cat.skipped[reason[0]] += 1
                    log.warning("skipping sample %s in shard %s: %s", entry["key"], path, reason[1])
                    continue
                cat.by_bucket[s].setdefault(tuple(entry["bucket"]), []).append(len(cat.keys))
                cat.keys.append(entry["key"])
                rows.append(_row(entry))
        if not cat.by_bucket[s]:
            bad = "; ".join(f"{p} (field {f}: {d})" for p, f, d in cat.bad_shards[:5])
            raise ValueError(f"source {spec.name!r} has no valid sample in {spec.shards!r} (skipped so far: "
                             f"{dict(cat.skipped)}{'; unreadable shards: ' + bad if bad else ''}); check the "
                             "shards with `anima-ft verify` or re-run prepare")
    reader.close()
    if v1_shards:
        log.warning("%d of %d shards are format v1, without member checksums: bit flips in their tensors or captions "
                    "cannot be detected; re-run `anima-ft prepare` to get checksummed (v2) shards", v1_shards,
                    len(cat.shard_paths))
    cat.table = np.asarray(rows, dtype=np.int64).reshape(len(rows), len(COLUMNS))
    return cat


class ShardReader:
    """Random-access sample reader over a catalog's shards, keeping a few files open (one per worker)."""

    def __init__(self, catalog: Catalog, max_open: int = 16):
        self.catalog = catalog
        self.max_open = max_open
        self._files: OrderedDict[int, object] = OrderedDict()

    def _file(self, shard: int):
        f = self._files.pop(shard, None)
        if f is None:
            f = open(self.catalog.shard_paths[shard], "rb")
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def read_entry(self, entry: dict) -> dict:
        """Decode one sample (see ``shard_format.decode_members``); raises ``SampleError``."""
        try:
            f = self._file(entry["shard"])
        except OSError as err:  # deleted or unreadable since the catalog was built
            raise SampleError("unreadable_shard", str(err)) from err
        return read_sample(f, entry, self.catalog.qwen_dim)

    def read(self, sample_id: int) -> dict:
        """Decode catalog sample ``sample_id``; raises ``SampleError``."""
        return self.read_entry(self.catalog.entry(sample_id))

    def close(self) -> None:
        """Close every open shard file."""
        while self._files:
            self._files.popitem()[1].close()
