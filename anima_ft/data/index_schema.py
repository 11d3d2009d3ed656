"""The shard index schema (``NAME.index.json``, format versions 1 and 2) and the check every loader runs on it.

A shard's index is trusted for seeks and read sizes, so it is checked as a whole when the shard is opened: every
field's presence, JSON type (``bool`` is not an int, ``3.0`` is not an int), range (no negative, no value above
2**53), and the layout the writer guarantees (sample spans ascending, 512-aligned, inside ``tar_bytes``; each
member's header and padded data inside its sample's span, members not overlapping; ``num_samples`` and ``buckets``
agreeing with ``samples``; ``fingerprint_hash`` the hash of ``fingerprint``; in v2 one 16-hex-digit checksum per
member). A violation is :class:`BadIndex` (a ``ValueError``) naming the shard and the field path, e.g.
``samples[3].members.json[1]``; the loader skips such a shard as ``unreadable_shard``.

Two per-sample defects the writer itself can produce are not schema errors but per-sample skips
(:func:`entry_problem`): a sample whose index lists fewer than the three members, or whose bucket is ``null``
(``missing_field``), and a sample that ends past the end of a truncated tar (``truncated``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

TAR_BLOCK = 512
MAX_INT = 2**53  # JSON-safe integer bound: anything larger is a damaged index, never a real size
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,80}")
CHECKSUM_RE = re.compile(r"[0-9a-f]{16}")
HASH_RE = re.compile(r"[0-9a-f]{64}")
REQUIRED_MEMBERS = ("json", "latent.safetensors", "text.safetensors")


class BadIndex(ValueError):
    """A shard index that breaks the schema; ``field`` is the offending field path (``"samples[3].span"``)."""

    def __init__(self, path: str | Path, field: str, detail: str):
        super().__init__(f"index {path}: field {field}: {detail}; this shard cannot be read: copy it again or "
                         "re-run `anima-ft prepare` for it")
        self.path, self.field, self.detail = str(path), field, detail


def fingerprint_hash(fingerprint: dict) -> str:
    """A stable sha256 of the fingerprint's canonical JSON (the index's ``fingerprint_hash``)."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


class _Checker:
    """Field checks that raise :class:`BadIndex` with the shard path."""

    def __init__(self, path: str | Path):
        self.path = path

    def fail(self, field: str, detail: str):
        raise BadIndex(self.path, field, detail)

    def get(self, obj: dict, key: str, where: str) -> Any:
        if key not in obj:
            self.fail(f"{where}{key}", "missing")
        return obj[key]

    def int_(self, value: Any, field: str, lo: int = 0, hi: int = MAX_INT) -> int:
        if type(value) is not int:  # bool and float (3.0) are refused: the writer only writes ints
            self.fail(field, f"{value!r} is a {type(value).__name__}, expected an integer")
        if not lo <= value <= hi:
            self.fail(field, f"{value} is outside [{lo}, {hi}]")
        return value

    def pair(self, value: Any, field: str, lo: int = 0) -> tuple[int, int]:
        if type(value) is not list or len(value) != 2:
            self.fail(field, f"{value!r} is not a list of two integers")
        return self.int_(value[0], f"{field}[0]", lo), self.int_(value[1], f"{field}[1]", lo)

    def dict_(self, value: Any, field: str) -> dict:
        if type(value) is not dict:
            self.fail(field, f"{type(value).__name__} found, expected an object")
        return value


def check_index(index: Any, path: str | Path, version: int) -> None:
    """Check a parsed index against the schema of ``version`` (1 or 2); raises :class:`BadIndex`."""
    c = _Checker(path)
    c.dict_(index, "(top level)")
    fingerprint = c.dict_(c.get(index, "fingerprint", ""), "fingerprint")
    fp_hash = c.get(index, "fingerprint_hash", "")
    if type(fp_hash) is not str or not HASH_RE.fullmatch(fp_hash):
        c.fail("fingerprint_hash", f"{fp_hash!r} is not 64 hex digits")
    if fingerprint_hash(fingerprint) != fp_hash:
        c.fail("fingerprint_hash", "does not match the hash of 'fingerprint' (one of them was altered)")
    tar_bytes = c.int_(c.get(index, "tar_bytes", ""), "tar_bytes")
    samples = c.get(index, "samples", "")
    if type(samples) is not list:
        c.fail("samples", f"{type(samples).__name__} found, expected a list")
    c.int_(c.get(index, "num_samples", ""), "num_samples", len(samples), len(samples))
    qwen_dim = c.get(index, "qwen_dim", "")
    if qwen_dim is not None or samples:
        c.int_(qwen_dim, "qwen_dim", 1)
    buckets = c.dict_(c.get(index, "buckets", ""), "buckets")
    for name, count in buckets.items():
        c.int_(count, f"buckets.{name}")
    skipped = c.dict_(c.get(index, "skipped", ""), "skipped")
    for reason, count in skipped.items():
        if reason == "examples":
            for r, names in c.dict_(count, "skipped.examples").items():
                if type(names) is not list or not all(type(n) is str for n in names):
                    c.fail(f"skipped.examples.{r}", "expected a list of strings")
        else:
            c.int_(count, f"skipped.{reason}")
    counted: dict[tuple[int, int] | None, int] = {}
    keys: set[str] = set()
    end_prev = 0
    for i, entry in enumerate(samples):
        end = _entry_ok(entry, version, end_prev, tar_bytes, keys)
        if end < 0:  # find and name the field (slow path, only for a bad index)
            _check_entry(c, i, entry, version, end_prev, tar_bytes, keys)
            c.fail(f"samples[{i}]", "breaks the schema")  # not reached: both checks accept the same entries
        keys.add(entry["key"])
        bucket = tuple(entry["bucket"]) if entry["bucket"] is not None else None
        counted[bucket] = counted.get(bucket, 0) + 1
        end_prev = end
    named = {f"{b[0]}x{b[1]}" if b else "none": n for b, n in counted.items()}
    if named != buckets:
        c.fail("buckets", f"{buckets} does not match the samples' buckets {named}")


def _entry_ok(e: Any, version: int, end_prev: int, tar_bytes: int, keys: set[str]) -> int:
    """The fast check of one sample entry (no strings built): its span end, or -1 when anything is off.
    It accepts exactly what :func:`_check_entry` accepts; that one names the field."""
    if type(e) is not dict or "bucket" not in e:
        return -1
    key = e.get("key")
    if type(key) is not str or key in keys or not KEY_RE.fullmatch(key):
        return -1
    bucket = e["bucket"]
    if bucket is not None:
        if type(bucket) is not list or len(bucket) != 2:
            return -1
        W, H = bucket
        if type(W) is not int or type(H) is not int or not (1 <= W <= MAX_INT and 1 <= H <= MAX_INT) or W % 8 or H % 8:
            return -1
    q, t, span, members = e.get("qwen_len"), e.get("t5_len"), e.get("span"), e.get("members")
    if type(q) is not int or type(t) is not int or not (0 <= q <= MAX_INT and 0 <= t <= MAX_INT):
        return -1
    if type(span) is not list or len(span) != 2 or type(members) is not dict:
        return -1
    start, end = span
    if type(start) is not int or type(end) is not int or not (0 <= start <= MAX_INT and 0 <= end <= MAX_INT):
        return -1
    if start % TAR_BLOCK or start < end_prev or end <= start or end > tar_bytes:
        return -1
    pairs = []
    for value in members.values():
        if type(value) is not list or len(value) != 2:
            return -1
        offset, size = value
        if type(offset) is not int or type(size) is not int or not (0 <= offset <= MAX_INT and 0 <= size <= MAX_INT):
            return -1
        pairs.append((offset, size))
    pairs.sort()
    member_end = start
    for offset, size in pairs:
        if offset % TAR_BLOCK or offset < member_end or offset + TAR_BLOCK + _padded(size) > end:
            return -1
        member_end = offset + TAR_BLOCK + _padded(size)
    if version >= 2:
        sums = e.get("checksums")
        if type(sums) is not dict or sums.keys() != members.keys():
            return -1
        for value in sums.values():
            if type(value) is not str or not CHECKSUM_RE.fullmatch(value):
                return -1
    return end


def _check_entry(c: _Checker, i: int, entry: Any, version: int, end_prev: int, tar_bytes: int,
                 keys: set[str]) -> None:
    """The detailed check of sample entry i: raises :class:`BadIndex` naming the first bad field."""
    where = f"samples[{i}]."
    c.dict_(entry, f"samples[{i}]")
    key = c.get(entry, "key", where)
    if type(key) is not str or not KEY_RE.fullmatch(key):
        c.fail(f"{where}key", f"{key!r} is not 1-80 letters, digits, '_' or '-'")
    if key in keys:
        c.fail(f"{where}key", f"{key!r} appears twice")
    bucket = c.get(entry, "bucket", where)
    if bucket is not None:
        W, H = c.pair(bucket, f"{where}bucket", lo=1)
        if W % 8 or H % 8:
            c.fail(f"{where}bucket", f"{bucket} is not a multiple of 8 (the VAE downscale)")
    c.int_(c.get(entry, "qwen_len", where), f"{where}qwen_len")
    c.int_(c.get(entry, "t5_len", where), f"{where}t5_len")
    start, end = c.pair(c.get(entry, "span", where), f"{where}span")
    if start % TAR_BLOCK or start < end_prev or end <= start or end > tar_bytes:
        c.fail(f"{where}span", f"[{start}, {end}] must be 512-aligned, after the previous sample (byte "
               f"{end_prev}) and end within tar_bytes {tar_bytes}")
    members = c.dict_(c.get(entry, "members", where), f"{where}members")
    pairs = {suffix: c.pair(value, f"{where}members.{suffix}") for suffix, value in members.items()}
    member_end = start
    for suffix, (offset, size) in sorted(pairs.items(), key=lambda kv: kv[1]):
        if offset % TAR_BLOCK or offset < member_end or offset + TAR_BLOCK + _padded(size) > end:
            c.fail(f"{where}members.{suffix}", f"[{offset}, {size}] must be 512-aligned, not overlap another "
                   f"member, and lie inside the sample's span [{start}, {end}]")
        member_end = offset + TAR_BLOCK + _padded(size)
    if version >= 2:
        sums = c.dict_(c.get(entry, "checksums", where), f"{where}checksums")
        if set(sums) != set(members):
            c.fail(f"{where}checksums", f"names {sorted(sums)} differ from the members {sorted(members)}")
        for suffix, value in sums.items():
            if type(value) is not str or not CHECKSUM_RE.fullmatch(value):
                c.fail(f"{where}checksums.{suffix}", f"{value!r} is not 16 lowercase hex digits")


def entry_problem(entry: dict, file_size: int) -> tuple[str, str] | None:
    """A per-sample defect of a schema-valid entry: ``(reason, detail)`` or None (see the module docstring)."""
    missing = [m for m in REQUIRED_MEMBERS if m not in entry["members"]]
    if missing or entry["bucket"] is None:
        return "missing_field", f"index lists no {missing or 'bucket'}"
    if entry["span"][1] > file_size:
        return "truncated", f"sample ends at byte {entry['span'][1]} but the tar has {file_size} bytes"
    return None
