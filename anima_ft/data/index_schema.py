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
    counted: dict[str, int] = {}
    keys: set[str] = set()
    end_prev = 0
    for i, entry in enumerate(samples):
        where = f"samples[{i}]."
        c.dict_(entry, f"samples[{i}]")
        key = c.get(entry, "key", where)
        if type(key) is not str or not KEY_RE.fullmatch(key):
            c.fail(f"{where}key", f"{key!r} is not 1-80 letters, digits, '_' or '-'")
        if key in keys:
            c.fail(f"{where}key", f"{key!r} appears twice")
        keys.add(key)
        bucket = c.get(entry, "bucket", where)
        if bucket is not None:
            W, H = c.pair(bucket, f"{where}bucket", lo=1)
            if W % 8 or H % 8:
                c.fail(f"{where}bucket", f"{bucket} is not a multiple of 8 (the VAE downscale)")
        name = f"{bucket[0]}x{bucket[1]}" if bucket else "none"
        counted[name] = counted.get(name, 0) + 1
        c.int_(c.get(entry, "qwen_len", where), f"{where}qwen_len")
        c.int_(c.get(entry, "t5_len", where), f"{where}t5_len")
        start, end = c.pair(c.get(entry, "span", where), f"{where}span")
        if start % TAR_BLOCK or start < end_prev or end <= start or end > tar_bytes:
            c.fail(f"{where}span", f"[{start}, {end}] must be 512-aligned, after the previous sample (byte "
                   f"{end_prev}) and end within tar_bytes {tar_bytes}")
        end_prev = end
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
    if counted != buckets:
        c.fail("buckets", f"{buckets} does not match the samples' buckets {counted}")


def entry_problem(entry: dict, file_size: int) -> tuple[str, str] | None:
    """A per-sample defect of a schema-valid entry: ``(reason, detail)`` or None (see the module docstring)."""
    missing = [m for m in REQUIRED_MEMBERS if m not in entry["members"]]
    if missing or entry["bucket"] is None:
        return "missing_field", f"index lists no {missing or 'bucket'}"
    if entry["span"][1] > file_size:
        return "truncated", f"sample ends at byte {entry['span'][1]} but the tar has {file_size} bytes"
    return None
