"""The pre-encoded shard format (version 2; version 1 still read): webdataset tar shards plus a JSON index.

One sample ``KEY`` is three tar members in this order (plain USTAR headers, mtime 0, so offsets are predictable;
``webdataset.TarWriter`` is not used because it ignores its ``format`` argument and may emit PAX headers):

* ``KEY.json``: ``{"caption", "source", "origin", "original_size": [w, h], "resized_size": [w, h],
  "crop": [left, top], "bucket": [W, H] (pixels), "caption_truncated": bool}``
* ``KEY.latent.safetensors``: ``latent`` bf16 ``[16, H/8, W/8]``, the normalized VAE latent (docs/model.md#vae)
* ``KEY.text.safetensors``: ``qwen_states`` bf16 ``[S, C]`` (Qwen3 last hidden state, no padding, C = 1024 for
  the real encoder) and ``t5_ids`` int32 ``[L]`` (T5 ids with ``</s>``, no padding)

Beside ``NAME.tar`` lies ``NAME.index.json`` (written after the tar, so its presence marks a finished shard)::

    {"format": "anima_ft.shard", "format_version": 2, "fingerprint": {...}, "fingerprint_hash": "sha256 hex",
     "checksum": "xxh3_64", "tar_bytes": N, "num_samples": n, "qwen_dim": C, "buckets": {"WxH": count},
     "skipped": {reason: count, "examples": {reason: [input names]}},
     "samples": [{"key", "bucket": [W, H], "qwen_len": S, "t5_len": L, "span": [start, end],
                  "members": {"json": [header_offset, size], ...}, "checksums": {"json": "16 hex", ...}}]}

Offsets are absolute byte positions of each member's 512-byte tar header, so the loader reads one sample with one
seek. ``checksums`` (v2) holds the xxh3_64 of each member's data, checked on every read (about 30 GB/s: about
2% of a sample's load time, see docs/data_format.md); version 1 indices have none and still load, with a warning.
The index is checked against its schema when a shard is opened (``index_schema.py``). The fingerprint names the
encoders and the sample layout; shards with different fingerprints are refused.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from anima_ft.data.index_schema import BadIndex, check_index, fingerprint_hash
from anima_ft.runtime import write_json_atomic

FORMAT_NAME = "anima_ft.shard"
FORMAT_VERSION = 2  # what the writer writes: v2 added per-member checksums to the index
READABLE_VERSIONS = (1, 2)
# The fingerprint's "format_version" is the version of the sample layout (members, dtypes, normalization). v2 kept
# it, so v1 and v2 shards of one encoder setup share a fingerprint: they mix, and prepare resumes over v1 shards.
SAMPLE_LAYOUT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_64"
MEMBERS = ("json", "latent.safetensors", "text.safetensors")  # sorted, as TarWriter writes them
LATENT_CHANNELS = 16
VAE_DOWNSCALE = 8
TAR_BLOCK = 512


def index_path_for(tar_path: str | Path) -> Path | str:
    """``dir/NAME.tar`` -> ``dir/NAME.index.json`` (a string for a URL such as ``s3://bucket/NAME.tar``)."""
    if "://" in str(tar_path):
        return str(tar_path)[: -len(".tar")] + ".index.json"
    tar_path = Path(tar_path)
    return tar_path.with_name(tar_path.name[: -len(".tar")] + ".index.json")


def make_fingerprint(vae_fingerprint: Any, text_fingerprint: Any) -> dict:
    """The encoder settings that make shards compatible: both encoders' fingerprints and the sample layout version."""
    return {"format_version": SAMPLE_LAYOUT_VERSION, "vae": vae_fingerprint, "text": text_fingerprint}


@dataclass
class EncodedSample:
    """One encoded sample, ready to be written (tensors on CPU)."""

    key: str
    latent: torch.Tensor  # [16, h, w], normalized
    qwen_states: torch.Tensor  # [S, C], no padding
    t5_ids: torch.Tensor  # [L]
    meta: dict = field(default_factory=dict)  # caption, source, origin, sizes, crop, bucket, caption_truncated


def encode_members(sample: EncodedSample) -> dict[str, bytes]:
    """Serialize one sample to its tar members (suffix -> bytes)."""
    latent = st_save({"latent": sample.latent.detach().to("cpu", torch.bfloat16).contiguous()})
    text = st_save(
        {
            "qwen_states": sample.qwen_states.detach().to("cpu", torch.bfloat16).contiguous(),
            "t5_ids": sample.t5_ids.detach().to("cpu", torch.int32).contiguous(),
        }
    )
    meta = json.dumps(sample.meta, sort_keys=True).encode()
    return {"json": meta, "latent.safetensors": latent, "text.safetensors": text}


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def member_checksum(data: bytes | memoryview) -> str:
    """The index checksum of one member's data: xxh3_64 as 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


class ShardWriter:
    """Writes one shard atomically: ``NAME.tar.tmp`` then rename, then ``NAME.index.json`` (also via a temp name).

    Use as a context manager; :meth:`add` writes a sample and records its offsets, :meth:`commit` finishes.
    Leaving the ``with`` block without ``commit`` (e.g. on an exception) removes the temporary file.
    """

    def __init__(self, tar_path: str | Path, fingerprint: dict):
        self.tar_path = Path(tar_path)
        if not self.tar_path.name.endswith(".tar"):
            raise ValueError(f"shard path {self.tar_path} must end in .tar")
        self.fingerprint = fingerprint
        self.tmp_path = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self.samples: list[dict] = []
        self.skipped: dict[str, int] = {}
        self.qwen_dim: int | None = None
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)
        self._offset = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.close()
        if self.tmp_path.exists():
            self.tmp_path.unlink()

    def add(self, sample: EncodedSample) -> None:
        """Append one sample (all three members) and record its index entry."""
        if "." in sample.key or len(sample.key) > 80:
            raise ValueError(f"sample key {sample.key!r} must have no dots and at most 80 characters")
        S, C = sample.qwen_states.shape
        self.add_raw(sample.key, encode_members(sample), sample.meta.get("bucket"), S, C, sample.t5_ids.numel())

    def add_raw(self, key: str, members: dict[str, bytes], bucket, qwen_len: int, qwen_dim: int, t5_len: int) -> None:
        """Append already-serialized members (tests use this to write deliberately broken samples)."""
        if self.qwen_dim is None:
            self.qwen_dim = int(qwen_dim)
        elif qwen_dim != self.qwen_dim:
            raise ValueError(f"qwen_states width {qwen_dim} differs from {self.qwen_dim} earlier in {self.tar_path}")
        start = self._offset
        offsets, pos = {}, start
        for suffix in sorted(members):
            offsets[suffix] = [pos, len(members[suffix])]
            pos += TAR_BLOCK + _padded(len(members[suffix]))
        for suffix in sorted(members):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode = len(members[suffix]), 0o444
            self._tar.addfile(info, io.BytesIO(members[suffix]))
        self._offset = pos
        assert self._tar.offset == pos, "tar offsets diverged from the USTAR layout"
        self.samples.append(
            {
                "key": key,
                "bucket": [int(b) for b in bucket] if bucket is not None else None,
                "qwen_len": int(qwen_len),
                "t5_len": int(t5_len),
                "span": [start, pos],
                "members": offsets,
                "checksums": {suffix: member_checksum(data) for suffix, data in sorted(members.items())},
            }
        )

    def commit(self, skipped: dict[str, int] | None = None) -> dict:
        """Close the tar, rename it into place, then write the index. Returns the index dict."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.tar_path)
        buckets: dict[str, int] = {}
        for s in self.samples:
            name = f"{s['bucket'][0]}x{s['bucket'][1]}" if s["bucket"] else "none"
            buckets[name] = buckets.get(name, 0) + 1
        index = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "fingerprint_hash": fingerprint_hash(self.fingerprint),
            "checksum": CHECKSUM_ALGORITHM,
            "tar_bytes": self.tar_path.stat().st_size,
            "num_samples": len(self.samples),
            "qwen_dim": self.qwen_dim,
            "buckets": buckets,
            "skipped": dict(skipped or {}),
            "samples": self.samples,
        }
        write_json_atomic(index_path_for(self.tar_path), index)
        return index


def read_index(tar_path: str | Path) -> dict:
    """Read the index beside ``tar_path`` and check it against the whole schema (``index_schema.check_index``).

    Any problem (no index, unreadable or non-UTF-8 bytes, bad JSON, another format or version, a field of the
    wrong type or range) is a ``ValueError`` (:class:`~anima_ft.data.index_schema.BadIndex`) naming the shard
    and the field.
    """
    ipath = index_path_for(tar_path)
    if not ipath.exists():
        raise BadIndex(ipath, "(file)", f"shard {tar_path} has no index {ipath.name}: only shards written by "
                       "`anima-ft prepare` can be streamed")
    try:
        raw = ipath.read_bytes()
    except OSError as err:
        raise BadIndex(ipath, "(file)", f"unreadable ({type(err).__name__}: {err})") from err
    return parse_index(raw, ipath)


def parse_index(raw: bytes, ipath: str | Path) -> dict:
    """Decode an index file's bytes and check them like :func:`read_index` (remote shards fetch the bytes)."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BadIndex(ipath, "(file)", f"unreadable ({type(err).__name__}: {err})") from err
    if type(index) is not dict:
        raise BadIndex(ipath, "(top level)", f"{type(index).__name__} found, expected an object")
    version = index.get("format_version")
    if index.get("format") != FORMAT_NAME or type(version) is not int or version not in READABLE_VERSIONS:
        raise BadIndex(ipath, "format_version", f"format {index.get('format')!r} version {version!r}; this "
                       f"anima_ft reads {FORMAT_NAME!r} versions {list(READABLE_VERSIONS)}")
    if version >= 2 and index.get("checksum") != CHECKSUM_ALGORITHM:
        raise BadIndex(ipath, "checksum", f"{index.get('checksum')!r}, expected {CHECKSUM_ALGORITHM!r}")
    check_index(index, ipath, version)
    return index


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of the loader's skip-count keys."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _member_ranges(span: bytes | bytearray, entry: dict, key: str) -> dict[str, tuple[int, int]]:
    """Where each member's data lies in ``span`` (``{suffix: (begin, end)}``), checking each tar header."""
    start = entry["span"][0]
    out = {}
    for suffix, (offset, size) in entry["members"].items():
        rel = offset - start
        header = bytes(span[rel : rel + TAR_BLOCK])
        if len(header) < TAR_BLOCK or len(span) < rel + TAR_BLOCK + size:
            raise SampleError("truncated", f"member {key}.{suffix} ends past the end of the file")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except Exception as err:  # tarfile raises several HeaderError subclasses
            raise SampleError("corrupt_member", f"bad tar header for {key}.{suffix}: {err}") from err
        if info.name != f"{key}.{suffix}" or info.size != size:
            raise SampleError("corrupt_member", f"tar header says {info.name!r} ({info.size} B), index says "
                              f"{key}.{suffix} ({size} B)")
        out[suffix] = (rel + TAR_BLOCK, rel + TAR_BLOCK + size)
    return out


def split_members(span: bytes, entry: dict, key: str) -> dict[str, bytes]:
    """Cut a sample's byte span (read from ``entry['span'][0]``) into members, checking each tar header."""
    return {suffix: bytes(span[a:b]) for suffix, (a, b) in _member_ranges(span, entry, key).items()}


def verify_checksums(members: dict[str, bytes], checksums: dict[str, str], key: str) -> None:
    """Compare every member's data with its index checksum; raises ``SampleError("checksum_mismatch")``."""
    for suffix, data in members.items():
        if member_checksum(data) != checksums[suffix]:
            raise SampleError("checksum_mismatch", f"member {key}.{suffix} differs from the data the index "
                              "describes (bit flip or overwritten bytes)")


def _all_finite_bf16(x: torch.Tensor) -> bool:
    """True when no element is Inf/NaN (see :func:`_bf16_bits_finite`)."""
    if x.numel() == 0:
        return True
    return _bf16_bits_finite(x.contiguous().view(torch.int16).numpy())


def _bf16_bits_finite(bits: np.ndarray) -> bool:
    """True when no bf16 value whose bits ``bits`` holds as int16 is Inf/NaN. A bf16 value is non-finite iff its 8
    exponent bits are all set, i.e. its bits read as int16 are >= 0x7F80 (positive Inf/NaN) or read as uint16 are
    >= 0xFF80 (negative Inf/NaN): two read-only max reductions, no temporary array (this check runs on every
    sample)."""
    if bits.size == 0:
        return True
    flat = bits.reshape(-1)
    return int(flat.max()) < 0x7F80 and int(flat.view(np.uint16).max()) < 0xFF80


# safetensors dtype names that decode to views without the library; any other name takes the library's path
# (torch dtype, numpy dtype of the same element bits: bf16 is read as int16 by numpy, which has no bf16)
_ST_DTYPES = {"BF16": (torch.bfloat16, np.int16), "F16": (torch.float16, np.float16),
              "F32": (torch.float32, np.float32), "F64": (torch.float64, np.float64), "I8": (torch.int8, np.int8),
              "I16": (torch.int16, np.int16), "I32": (torch.int32, np.int32), "I64": (torch.int64, np.int64),
              "U8": (torch.uint8, np.uint8), "BOOL": (torch.bool, np.bool_)}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's limit on the header size
_ST_KEYS = {"dtype", "shape", "data_offsets"}


def _refuse_json(*args):
    raise ValueError("not in the plain form the view decoder takes")


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        _refuse_json()
    return out


def _safetensors_views(buf: bytearray, arr: np.ndarray, address: int, begin: int,
                       end: int) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]] | None:
    """The tensors of the safetensors file in bytes ``[begin, end)`` of ``buf`` (``arr``: ``buf`` as a numpy uint8
    array; ``address``: where ``buf`` lies in memory), as views of it: ``({name: tensor}, {name: numpy array of
    the same elements' bits})``.

    Returns None, and the caller decodes with the safetensors library instead (which then returns the same tensors or
    raises the error it raises anyway), unless the file has the plain form ``st_save`` writes: a header of ASCII
    JSON without escapes, NaN literals or repeated keys; tensors with exactly dtype / shape / data_offsets, a dtype
    of ``_ST_DTYPES``, at least one element, and data aligned to the element size; data regions back to back from
    0 to the end of the file (the library's own rules). So every accepted file is one the library accepts, decoded
    to the same dtypes, shapes and values. The views are made with numpy and handed to torch once per tensor:
    each torch call releases the GIL, which in the loader's decode thread is a hand-over to the event loop's thread
    and back, so there are few of them.
    """
    size = end - begin
    if size < 8:
        return None
    n = int.from_bytes(buf[begin : begin + 8], "little")
    if n > _ST_MAX_HEADER or 8 + n > size:
        return None
    header_bytes = bytes(buf[begin + 8 : begin + 8 + n])
    if not header_bytes.startswith(b"{") or not header_bytes.isascii() or b"\\" in header_bytes:
        return None
    try:
        header = json.loads(header_bytes, parse_constant=_refuse_json, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        return None
    if type(header) is not dict:
        return None
    meta = header.pop("__metadata__", None)
    if meta is not None and (type(meta) is not dict or any(type(v) is not str for v in meta.values())):
        return None
    tensors = []
    for name, info in header.items():
        if type(info) is not dict or info.keys() != _ST_KEYS or type(info["dtype"]) is not str:
            return None
        dtype, shape, offsets = _ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
            return None
        if not all(type(d) is int and 0 <= d < 2**63 for d in (*shape, *offsets)):
            return None
        numel = math.prod(shape)
        if numel == 0:
            return None
        tensors.append((offsets[0], offsets[1], name, dtype, shape, numel))
    tensors.sort(key=lambda t: (t[0], t[1]))
    data_start, position, views = begin + 8 + n, 0, []
    for start, stop, name, (dtype, np_dtype), shape, numel in tensors:
        itemsize = dtype.itemsize
        if start != position or stop - start != numel * itemsize or (address + data_start + start) % itemsize:
            return None
        views.append((name, dtype, arr[data_start + start : data_start + stop].view(np_dtype).reshape(shape)))
        position = stop
    if data_start + position != end:
        return None
    out, bits = {}, {}
    for name, dtype, a in views:
        tensor = torch.from_numpy(a)
        out[name], bits[name] = tensor.view(dtype) if dtype == torch.bfloat16 else tensor, a
    return out, bits


def _check_decoded(meta, latent: dict, text: dict, entry: dict, qwen_dim: int,
                   bits: dict[str, np.ndarray] | None = None) -> dict:
    """The checks of :func:`decode_members` after decoding; returns the sample dict. ``bits``: numpy arrays of
    the elements of some of the tensors (same shapes and bits), which the value checks read instead (no torch
    call)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
        raise SampleError("missing_field", "json has no string 'caption'")
    for name, store in (("latent", latent), ("qwen_states", text), ("t5_ids", text)):
        if name not in store:
            raise SampleError("missing_field", f"tensor {name!r} absent")
    lat, qwen, t5 = latent["latent"], text["qwen_states"], text["t5_ids"]
    W, H = entry["bucket"]
    want = {
        "latent": (lat, (LATENT_CHANNELS, H // VAE_DOWNSCALE, W // VAE_DOWNSCALE)),
        "qwen_states": (qwen, (entry["qwen_len"], qwen_dim)),
        "t5_ids": (t5, (entry["t5_len"],)),
    }
    for name, (tensor, shape) in want.items():
        if tuple(tensor.shape) != shape:
            raise SampleError("bad_shape", f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    bits = bits or {}
    t5_values = bits.get("t5_ids", t5)
    if t5.dtype.is_floating_point or t5.dtype == torch.bool or (
            t5.numel() and (int(t5_values.min()) < 0 or int(t5_values.max()) >= 32128)):
        raise SampleError("bad_value", "t5_ids must be integers in [0, 32128)")
    if lat.dtype != torch.bfloat16 or qwen.dtype != torch.bfloat16 or t5.dtype != torch.int32:
        raise SampleError("bad_shape", f"latent / qwen_states / t5_ids are {lat.dtype} / {qwen.dtype} / {t5.dtype}, "
                          "expected bfloat16 / bfloat16 / int32")
    finite = [_bf16_bits_finite(bits[k]) if k in bits else _all_finite_bf16(x) for k, x in (("latent", lat),
                                                                                          ("qwen_states", qwen))]
    if not all(finite):
        raise SampleError("non_finite", "latent or qwen_states holds NaN/Inf")
    return {"latent": lat, "qwen_states": qwen, "t5_ids": t5, "meta": meta}


def decode_members(members: dict[str, bytes], entry: dict, qwen_dim: int) -> dict:
    """Decode and check one sample's members against its index entry; raises :class:`SampleError`.

    Returns ``{"latent": bf16 [16,h,w], "qwen_states": bf16 [S,C], "t5_ids": int32 [L], "meta": dict}``, each tensor
    owning its memory (decoded by the safetensors library). :func:`decode_span` gives the same result with views.
    """
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SampleError("missing_field", f"members {missing} absent")
    try:
        meta = json.loads(members["json"].decode("utf-8"))  # strict: no UTF-16 guess, no encoded surrogates
        latent = st_load(bytes(members["latent.safetensors"]))
        text = st_load(bytes(members["text.safetensors"]))
    except Exception as err:  # json and safetensors raise many types on garbage
        raise SampleError("corrupt_member", f"cannot decode: {type(err).__name__}: {err}") from err
    return _check_decoded(meta, latent, text, entry, qwen_dim)


def read_sample(fileobj: io.BufferedReader, entry: dict, qwen_dim: int) -> dict:
    """Read, verify (checksums, when the entry has them) and decode one sample with one seek.

    ``entry`` must have passed the index schema check. Raises :class:`SampleError` only: an I/O error on the
    tar is ``unreadable_shard``. The bytes are read into a new buffer that the returned tensors view (no copy).
    """
    start, end = entry["span"]
    buf = bytearray(end - start)
    try:
        fileobj.seek(start)
        got = fileobj.readinto(buf)
    except OSError as err:
        raise SampleError("unreadable_shard", f"reading bytes [{start}, {end}): {err}") from err
    del buf[got:]  # short at the end of the file: the member checks report it as truncated
    return decode_owned(buf, entry, qwen_dim)


def decode_span(span: bytes, entry: dict, qwen_dim: int) -> dict:
    """Split, verify (checksums, when the entry has them) and decode a sample's bytes ``[span[0], span[1])``, however
    they were read (a local seek or a ranged GET); raises :class:`SampleError`.

    The result equals :func:`decode_members` of :func:`split_members` (same reasons, dtypes, shapes and bits); its
    tensors are writable views of one private copy of ``span``, so they share no memory with ``span`` itself.
    """
    return decode_owned(bytearray(span), entry, qwen_dim)


def decode_owned(buf: bytearray, entry: dict, qwen_dim: int) -> dict:
    """:func:`decode_span` without its copy, for a buffer that the caller hands over (nothing else reads or writes
    it afterwards): the tensors returned are views of ``buf`` itself. Same result, reasons and bits as
    :func:`decode_span`; ``TypeError`` for anything but a ``bytearray`` (``bytes`` cannot back writable tensors)."""
    if type(buf) is not bytearray:
        raise TypeError(f"decode_owned takes the bytearray it decodes in place, got {type(buf).__name__}; use "
                        "decode_span for bytes")
    key = entry["key"]
    ranges = _member_ranges(buf, entry, key)
    if entry.get("checksums") is not None:
        view = memoryview(buf)
        verify_checksums({suffix: view[a:b] for suffix, (a, b) in ranges.items()}, entry["checksums"], key)
    missing = [m for m in MEMBERS if m not in ranges]
    if missing:
        raise SampleError("missing_field", f"members {missing} absent")
    arr = np.frombuffer(buf, dtype=np.uint8)  # not empty: the three members' tar headers are in it
    address = arr.__array_interface__["data"][0]
    try:
        a, b = ranges["json"]
        meta = json.loads(bytes(buf[a:b]).decode("utf-8"))  # strict: no UTF-16 guess, no encoded surrogates
        stores, bits = [], {}
        for suffix in ("latent.safetensors", "text.safetensors"):
            a, b = ranges[suffix]
            views = _safetensors_views(buf, arr, address, a, b)
            if views is None:
                stores.append(st_load(bytes(buf[a:b])))
            else:
                stores.append(views[0])
                bits.update(views[1])
    except Exception as err:  # json and safetensors raise many types on garbage
        raise SampleError("corrupt_member", f"cannot decode: {type(err).__name__}: {err}") from err
    return _check_decoded(meta, stores[0], stores[1], entry, qwen_dim, bits)
