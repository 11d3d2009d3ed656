"""Seeded corruption fuzzing of real ``prepare`` shards: one harness for the whole class of damaged-shard defects.

Case ``c`` of seed ``s`` copies the pristine shards, applies corruption kind ``KIND_NAMES[c % len(KIND_NAMES)]``
with ``random.Random(f"{s}-{c}")`` (so any case reruns alone), states what the loader must do (:class:`Expect`),
then streams the copy with ``validate="full"`` and ``validate="index"`` (DataLoader workers in every fourth case)
and checks, against the pristine decoded samples:

* no exception other than the named ``ValueError`` when nothing usable is left, no hang (a deadline per case);
* every delivered sample bitwise identical to its pristine copy (latent, Qwen states, T5 ids, caption);
* full mode: the skip counts exact (each lost sample counted once, with a reason the corruption allows; a whole
  shard counted once as ``unreadable_shard``), the first epoch exactly the surviving samples, no skip while
  streaming; index mode: build-time skips a subset of full mode's, streaming skips only full mode's reasons.

Run as a script for a per-kind outcome report: ``python tests/data/fuzz_shards.py --cases 350 --seed 0``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import shutil
import signal
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.shard_format import MEMBERS, TAR_BLOCK, ShardWriter, index_path_for, member_checksum
from anima_ft.data.sources import ShardReader, build_catalog

ANY_SAMPLE_REASON = {"corrupt_member", "checksum_mismatch", "truncated", "bad_shape", "bad_value", "missing_field",
                     "non_finite"}
INDEX_LEVEL_REASONS = {"unreadable_shard", "truncated", "missing_field"}
CASE_DEADLINE_S = 120


@dataclass
class Expect:
    """What the loader must do with one corrupted copy.

    may_fail[key]: reasons sample ``key`` may be skipped with (a pristine key not listed must survive);
    must_fail: keys that must be lost; unreadable: "must" / "may" / None, the victim shard skipped whole (counted
    once, its keys ``victim_keys`` lost); uncounted: keys that may vanish without a count (an index swapped for
    another shard's lists other samples); extra: (count, reasons) of skips of index entries that are no pristine
    sample; must_change: the outcome may not be "identical"; v1: the shard became format v1.
    """

    may_fail: dict[str, set[str]] = field(default_factory=dict)
    must_fail: set[str] = field(default_factory=set)
    unreadable: str | None = None
    victim_keys: set[str] = field(default_factory=set)
    uncounted: set[str] = field(default_factory=set)
    extra: tuple[int, set[str]] = (0, set())
    must_change: bool = False
    v1: bool = False

    def fail(self, key: str, *reasons: str, must: bool = True) -> Expect:
        self.may_fail.setdefault(key, set()).update(reasons)
        if must:
            self.must_fail.add(key)
        return self


class Copy:
    """A working copy of the pristine shard directory, with the pristine indices for reference."""

    def __init__(self, root: Path):
        self.root = root
        self.tars = sorted(root.glob("*.tar"))
        self.indices = [json.loads(index_path_for(t).read_text()) for t in self.tars]

    def keys(self, k: int) -> set[str]:
        return {e["key"] for e in self.indices[k]["samples"]}

    def all_keys(self) -> set[str]:
        return set().union(*(self.keys(k) for k in range(len(self.tars))))

    def victim(self, rng: random.Random) -> tuple[int, int, dict]:
        """(shard k, sample i, its index entry), chosen at random."""
        k = rng.randrange(len(self.tars))
        i = rng.randrange(len(self.indices[k]["samples"]))
        return k, i, self.indices[k]["samples"][i]

    def write_index(self, k: int, index: dict | bytes) -> None:
        data = index if isinstance(index, bytes) else json.dumps(index).encode()
        index_path_for(self.tars[k]).write_bytes(data)

    def raw_members(self, k: int) -> list[dict[str, bytes]]:
        out = []
        with open(self.tars[k], "rb") as f:
            for entry in self.indices[k]["samples"]:
                members = {}
                for suffix, (offset, size) in entry["members"].items():
                    f.seek(offset + TAR_BLOCK)
                    members[suffix] = f.read(size)
                out.append(members)
        return out

    def rewrite(self, k: int, i: int, edit: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
        """Write shard k again with the real writer (valid checksums), sample i's members passed through ``edit``."""
        index, raw = self.indices[k], self.raw_members(k)
        with ShardWriter(self.tars[k], index["fingerprint"]) as writer:
            for j, (entry, members) in enumerate(zip(index["samples"], raw)):
                members = edit(dict(members)) if j == i else members
                writer.add_raw(entry["key"], members, entry["bucket"], entry["qwen_len"], index["qwen_dim"],
                               entry["t5_len"])
            writer.commit(skipped=index["skipped"])


KINDS: dict[str, Callable[[random.Random, Copy], Expect]] = {}


def kind(fn):
    KINDS[fn.__name__] = fn
    return fn


# --- byte-level damage to the tar (after the checksums were written) -------------------------------------------

def _byte_damage(copy: Copy, k: int, new: bytes) -> Expect:
    """Write ``new`` over tar k (same length) and expect, per sample, what its changed bytes allow."""
    old = copy.tars[k].read_bytes()
    copy.tars[k].write_bytes(new)
    expect = Expect()
    for entry in copy.indices[k]["samples"]:
        reasons, must = set(), False
        for offset, size in entry["members"].values():
            if old[offset : offset + TAR_BLOCK] != new[offset : offset + TAR_BLOCK]:
                reasons.add("corrupt_member")  # may pass: bytes after the NUL of the checksum field are unchecked
            data = slice(offset + TAR_BLOCK, offset + TAR_BLOCK + size)
            if old[data] != new[data]:
                reasons.add("checksum_mismatch")
                must = True
        if reasons:
            expect.fail(entry["key"], *reasons, must=must)
    return expect


@kind
def tar_bitflip(rng, copy):
    k = rng.randrange(len(copy.tars))
    data = bytearray(copy.tars[k].read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return _byte_damage(copy, k, bytes(data))


@kind
def tar_overwrite(rng, copy):
    k = rng.randrange(len(copy.tars))
    data = bytearray(copy.tars[k].read_bytes())
    n = rng.randint(1, 64)
    at = rng.randrange(len(data) - n)
    data[at : at + n] = bytes(rng.randrange(256) for _ in range(n))
    return _byte_damage(copy, k, bytes(data))


@kind
def tar_zero_block(rng, copy):
    k = rng.randrange(len(copy.tars))
    data = bytearray(copy.tars[k].read_bytes())
    at = rng.randrange(len(data) // TAR_BLOCK) * TAR_BLOCK
    data[at : at + TAR_BLOCK] = bytes(TAR_BLOCK)
    return _byte_damage(copy, k, bytes(data))


@kind
def tar_nan_bytes(rng, copy):
    """NaN / Inf bit patterns written into a tensor's bytes after the shard was made."""
    k, _, entry = copy.victim(rng)
    offset, size = entry["members"][rng.choice(["latent.safetensors", "text.safetensors"])]
    data = bytearray(copy.tars[k].read_bytes())
    header_len = int.from_bytes(data[offset + TAR_BLOCK : offset + TAR_BLOCK + 8], "little")
    first = offset + TAR_BLOCK + 8 + header_len  # tensor bytes start after the safetensors JSON header
    at = first + 2 * rng.randrange((size - 8 - header_len) // 2 - 1)
    data[at : at + 2] = rng.choice([b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"])  # bf16 NaN, +Inf, -Inf
    return _byte_damage(copy, k, bytes(data))


@kind
def tar_truncate(rng, copy):
    k = rng.randrange(len(copy.tars))
    size = copy.tars[k].stat().st_size
    cut = rng.choice([0, rng.randrange(size), size - 1, rng.randrange(size // TAR_BLOCK) * TAR_BLOCK])
    with open(copy.tars[k], "r+b") as f:
        f.truncate(cut)
    expect = Expect()
    for entry in copy.indices[k]["samples"]:
        if entry["span"][1] > cut:
            expect.fail(entry["key"], "truncated")
    return expect


@kind
def tar_extend(rng, copy):
    k = rng.randrange(len(copy.tars))
    with open(copy.tars[k], "ab") as f:
        f.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))))
    return Expect()


# --- members written by the real writer (checksums valid), contents wrong ---------------------------------------

def _edit_tensor(member: str, name: str, change: Callable[[torch.Tensor], torch.Tensor]):
    def edit(members):
        tensors = dict(st_load(members[member]))
        tensors[name] = change(tensors[name])
        return {**members, member: st_save(tensors)}
    return edit


def _pick_tensor(rng) -> tuple[str, str]:
    return rng.choice([("latent.safetensors", "latent"), ("text.safetensors", "qwen_states")])


@kind
def rw_nan(rng, copy):
    k, i, entry = copy.victim(rng)
    member, name = _pick_tensor(rng)
    value = rng.choice([float("nan"), float("inf"), -float("inf")])

    def poison(x):
        x = x.clone()
        x.view(-1)[rng.randrange(x.numel())] = value
        return x
    copy.rewrite(k, i, _edit_tensor(member, name, poison))
    return Expect().fail(entry["key"], "non_finite")


@kind
def rw_dtype(rng, copy):
    k, i, entry = copy.victim(rng)
    member, name, dtype = rng.choice([("latent.safetensors", "latent", torch.float32),
                                      ("latent.safetensors", "latent", torch.float16),
                                      ("text.safetensors", "qwen_states", torch.float32),
                                      ("text.safetensors", "t5_ids", torch.int64),
                                      ("text.safetensors", "t5_ids", torch.int16)])
    copy.rewrite(k, i, _edit_tensor(member, name, lambda x: x.to(dtype)))
    return Expect().fail(entry["key"], "bad_shape")


@kind
def rw_shape(rng, copy):
    k, i, entry = copy.victim(rng)
    member, name, change = rng.choice([("latent.safetensors", "latent", lambda x: x[:, :-1]),
                                       ("latent.safetensors", "latent", lambda x: x[:8]),
                                       ("text.safetensors", "qwen_states", lambda x: x[:-1]),
                                       ("text.safetensors", "qwen_states", lambda x: torch.cat([x, x])),
                                       ("text.safetensors", "t5_ids", lambda x: x[:-1])])
    copy.rewrite(k, i, _edit_tensor(member, name, lambda x: change(x).contiguous()))
    return Expect().fail(entry["key"], "bad_shape")


@kind
def rw_t5_range(rng, copy):
    k, i, entry = copy.victim(rng)
    value = rng.choice([32128, 40000, 2**31 - 1, -1])

    def poison(x):
        x = x.clone()
        x[rng.randrange(x.numel())] = value
        return x
    copy.rewrite(k, i, _edit_tensor("text.safetensors", "t5_ids", poison))
    return Expect().fail(entry["key"], "bad_value")


@kind
def rw_no_caption(rng, copy):
    k, i, entry = copy.victim(rng)

    def edit(members):
        meta = json.loads(members["json"])
        if rng.random() < 0.5:
            del meta["caption"]
        else:
            meta["caption"] = rng.choice([None, 5, ["a"]])
        return {**members, "json": json.dumps(meta).encode()}
    copy.rewrite(k, i, edit)
    return Expect().fail(entry["key"], "missing_field")


@kind
def rw_drop_member(rng, copy):
    k, i, entry = copy.victim(rng)
    suffix = rng.choice(MEMBERS)
    copy.rewrite(k, i, lambda m: {s: d for s, d in m.items() if s != suffix})
    return Expect().fail(entry["key"], "missing_field")


@kind
def rw_missing_tensor(rng, copy):
    k, i, entry = copy.victim(rng)
    member, name = rng.choice([("latent.safetensors", "latent"), ("text.safetensors", "qwen_states"),
                               ("text.safetensors", "t5_ids")])

    def edit(members):
        tensors = dict(st_load(members[member]))
        tensors["renamed"] = tensors.pop(name)
        return {**members, member: st_save(tensors)}
    copy.rewrite(k, i, edit)
    return Expect().fail(entry["key"], "missing_field")


@kind
def rw_garbage(rng, copy):
    k, i, entry = copy.victim(rng)
    suffix = rng.choice(MEMBERS)
    garbage = b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 700)))
    copy.rewrite(k, i, lambda m: {**m, suffix: garbage})
    return Expect().fail(entry["key"], "corrupt_member")


@kind
def rw_non_utf8(rng, copy):
    k, i, entry = copy.victim(rng)

    def edit(members):
        raw = members["json"]
        at = raw.index(b'"caption": "') + len(b'"caption": "') + 1
        return {**members, "json": raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + raw[at:]}
    copy.rewrite(k, i, edit)
    return Expect().fail(entry["key"], "corrupt_member")


@kind
def rw_extra_member(rng, copy):
    k, i, _ = copy.victim(rng)
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(0, 900)))
    copy.rewrite(k, i, lambda m: {**m, rng.choice(["aaa.bin", "extra.json", "zz.txt"]): extra})
    return Expect()


# --- the index ----------------------------------------------------------------------------------------------------

def _paths(index: dict, i: int) -> tuple[list[tuple], list[tuple]]:
    """(all structural field paths, the integer ones) of the index and its sample i."""
    top = [("format_version",), ("checksum",), ("fingerprint",), ("fingerprint_hash",), ("tar_bytes",),
           ("num_samples",), ("qwen_dim",), ("buckets",), ("skipped",), ("samples",), ("samples", i)]
    e = ("samples", i)
    entry = [e + p for p in [("key",), ("bucket",), ("bucket", 0), ("bucket", 1), ("qwen_len",), ("t5_len",),
                             ("span",), ("span", 0), ("span", 1), ("members",), ("checksums",)]]
    for m in MEMBERS:
        entry += [e + ("members", m), e + ("members", m, 0), e + ("members", m, 1), e + ("checksums", m)]
    ints = [p for p in top + entry if type(_get(index, p)) is int]
    return top + entry, ints


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


def _mutate_index(rng, copy, mutate: Callable[[dict, tuple], None], int_only: bool) -> Expect:
    k, i, entry = copy.victim(rng)
    index = json.loads(json.dumps(copy.indices[k]))
    paths, ints = _paths(index, i)
    path = rng.choice(ints if int_only else paths)
    mutate(index, path)
    copy.write_index(k, index)
    if path == ("samples", i, "bucket") and _get(index, path) is None:
        return Expect().fail(entry["key"], "missing_field")  # the writer itself records a missing bucket as null
    return Expect(unreadable="must", victim_keys=copy.keys(k))


@kind
def idx_null(rng, copy):
    return _mutate_index(rng, copy, lambda index, path: _set(index, path, None), int_only=False)


@kind
def idx_drop(rng, copy):
    return _mutate_index(rng, copy, lambda index, path: _get(index, path[:-1]).pop(path[-1]), int_only=False)


def _wrong_type(value):
    return {int: str(value), str: 12345, list: {"a": 1}, dict: [1, 2]}.get(type(value), "x")


@kind
def idx_type(rng, copy):
    return _mutate_index(rng, copy, lambda index, path: _set(index, path, _wrong_type(_get(index, path))), False)


@kind
def idx_float(rng, copy):
    return _mutate_index(rng, copy, lambda index, path: _set(index, path, _get(index, path) + rng.choice([0.0, 0.5])),
                         int_only=True)


@kind
def idx_huge(rng, copy):
    return _mutate_index(rng, copy, lambda index, path: _set(index, path, rng.choice([2**53 + 1, 10**30, 2**63,
                                                                                     2**64 + 7])), int_only=True)


@kind
def idx_negative(rng, copy):
    return _mutate_index(rng, copy, lambda index, path: _set(index, path, -1 - _get(index, path)), int_only=True)


@kind
def idx_lie(rng, copy):
    """Integers of the right type that lie: lengths, offsets, sizes, a bucket changed consistently."""
    k, i, entry = copy.victim(rng)
    index = json.loads(json.dumps(copy.indices[k]))
    e = index["samples"][i]
    what = rng.choice(["qwen_len", "t5_len", "bucket", "offset", "size", "tar_bytes"])
    if what in ("qwen_len", "t5_len"):
        e[what] = max(0, e[what] + rng.choice([-1, 1, 7]))
        if e[what] == entry[what]:
            e[what] += 1
        copy.write_index(k, index)
        return Expect().fail(entry["key"], "bad_shape")
    if what == "bucket":  # the summary follows, so the index is consistent and only the latent shape disagrees
        old = f"{e['bucket'][0]}x{e['bucket'][1]}"
        e["bucket"] = [e["bucket"][0] + 8 * rng.randint(1, 4), e["bucket"][1]]
        index["buckets"][old] -= 1
        new = f"{e['bucket'][0]}x{e['bucket'][1]}"
        index["buckets"][new] = index["buckets"].get(new, 0) + 1
        index["buckets"] = {b: n for b, n in index["buckets"].items() if n}
        copy.write_index(k, index)
        return Expect().fail(entry["key"], "bad_shape")
    if what == "tar_bytes":  # claims a longer tar: samples are still checked against the real size
        index["tar_bytes"] += rng.randint(1, 10**6)
        copy.write_index(k, index)
        return Expect()
    member = e["members"][rng.choice(MEMBERS)]
    if what == "offset":
        member[0] += rng.choice([-TAR_BLOCK, TAR_BLOCK])
    else:
        member[1] = max(0, member[1] + rng.choice([-rng.randint(1, 600), rng.randint(1, 600)]))
    copy.write_index(k, index)
    expect = Expect(unreadable="may", victim_keys=copy.keys(k), must_change=True)
    return expect.fail(entry["key"], "corrupt_member", must=False)


@kind
def idx_checksum(rng, copy):
    k, i, entry = copy.victim(rng)
    index = json.loads(json.dumps(copy.indices[k]))
    sums = index["samples"][i]["checksums"]
    suffix = rng.choice(MEMBERS)
    sums[suffix] = member_checksum(sums[suffix].encode())  # another valid 16-hex-digit value
    copy.write_index(k, index)
    return Expect().fail(entry["key"], "checksum_mismatch")


@kind
def idx_bitflip(rng, copy):
    k = rng.randrange(len(copy.tars))
    data = bytearray(index_path_for(copy.tars[k]).read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    copy.write_index(k, bytes(data))
    expect = Expect(unreadable="may", victim_keys=copy.keys(k))
    for key in copy.keys(k):
        expect.fail(key, *ANY_SAMPLE_REASON, must=False)
    return expect


@kind
def idx_bytes(rng, copy):
    """Not JSON any more: non-UTF-8 bytes, cut short, empty, or random bytes."""
    k = rng.randrange(len(copy.tars))
    data = index_path_for(copy.tars[k]).read_bytes()
    at = rng.randrange(len(data))
    data = rng.choice([data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x80\x80"]) + data[at:], data[:at], b"",
                       bytes(rng.randrange(256) for _ in range(64))])
    copy.write_index(k, data)
    return Expect(unreadable="must", victim_keys=copy.keys(k))


@kind
def idx_swap(rng, copy):
    """Another shard's (valid) index over this one: its entries fail against this tar, this tar's samples vanish."""
    k = rng.randrange(len(copy.tars))
    other = (k + 1 + rng.randrange(len(copy.tars) - 1)) % len(copy.tars)
    copy.write_index(k, copy.indices[other])
    return Expect(uncounted=copy.keys(k),
                  extra=(len(copy.indices[other]["samples"]), {"corrupt_member", "truncated", "checksum_mismatch"}))


@kind
def idx_v1(rng, copy):
    """A format v1 index (no checksums): still loads, with one warning."""
    k = rng.randrange(len(copy.tars))
    index = json.loads(json.dumps(copy.indices[k]))
    index["format_version"] = 1
    del index["checksum"]
    for entry in index["samples"]:
        del entry["checksums"]
    copy.write_index(k, index)
    return Expect(v1=True)


# --- files missing or extra -----------------------------------------------------------------------------------------

@kind
def file_missing(rng, copy):
    k = rng.randrange(len(copy.tars))
    (index_path_for(copy.tars[k]) if rng.random() < 0.5 else copy.tars[k]).unlink()
    return Expect(unreadable="must", victim_keys=copy.keys(k))


@kind
def file_extra(rng, copy):
    """Stray files: a tar without index / an index without tar are counted, other names are ignored."""
    which = rng.choice(["tar", "plain_tar", "index", "other"])
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
    if which == "tar":
        (copy.root / "stray-0000.tar").write_bytes(junk)
    elif which == "plain_tar":
        with tarfile.open(copy.root / "stray-0001.tar", "w") as tar:
            tar.add(copy.root / "prepare_summary.json", arcname="x.json")
    elif which == "index":
        (copy.root / "orphan-0000.index.json").write_bytes(junk)
    else:
        for name in ("README.txt", "a.tar.tmp", "b.index.json.tmp", "notes.json"):
            (copy.root / name).write_bytes(junk)
        return Expect()
    return Expect(unreadable="must")


KIND_NAMES = list(KINDS)


# --- running and judging one case ------------------------------------------------------------------------------------

def pristine_samples(root: Path) -> dict[str, dict]:
    """key -> decoded pristine sample of every shard in ``root``."""
    cat = build_catalog([SourceSpec("fz", str(root))], validate="full")
    assert not cat.skipped, f"pristine shards are not clean: {dict(cat.skipped)}"
    reader = ShardReader(cat)
    out = {cat.keys[i]: reader.read(i) for i in range(len(cat))}
    reader.close()
    return out


def check_batch(batch: dict, pristine: dict[str, dict]) -> list[str]:
    """Keys of the batch, asserting each sample bitwise equal to its pristine copy."""
    for b, key in enumerate(batch["key"]):
        ref = pristine[key]
        S, L = ref["qwen_states"].shape[0], ref["t5_ids"].shape[0]
        assert torch.equal(batch["latents"][b], ref["latent"]), f"{key}: latent altered"
        assert int(batch["qwen_mask"][b].sum()) == S and torch.equal(batch["qwen_states"][b, :S], ref["qwen_states"]), \
            f"{key}: qwen_states altered"
        assert int(batch["t5_mask"][b].sum()) == L and torch.equal(batch["t5_ids"][b, :L], ref["t5_ids"].long()), \
            f"{key}: t5_ids altered"
        assert batch["caption"][b] == ref["meta"]["caption"], f"{key}: caption altered"
    return list(batch["key"])


def judge_catalog(expect: Expect, skips: Counter, valid: set[str], pristine: set[str]) -> None:
    """Full-mode skip counts against the expectation (see :class:`Expect`)."""
    lost = pristine - valid
    rest = Counter(skips)
    unreadable = rest.pop("unreadable_shard", 0)
    if unreadable:
        assert expect.unreadable in ("must", "may") and unreadable == 1, f"unexpected unreadable_shard x{unreadable}"
        assert expect.victim_keys <= lost, f"unreadable shard's samples still streamed: {expect.victim_keys - lost}"
        lost -= expect.victim_keys
    else:
        assert expect.unreadable != "must", "the shard should have been skipped as unreadable_shard"
        assert expect.must_fail <= lost, f"samples not skipped: {sorted(expect.must_fail - lost)}"
        if expect.must_change:
            assert lost, "a lying index went unnoticed"
    lost -= expect.uncounted
    assert lost <= set(expect.may_fail), f"samples lost without cause: {sorted(lost - set(expect.may_fail))}"
    allowed = set().union(*(expect.may_fail[k] for k in lost)) | expect.extra[1]
    assert set(rest) <= allowed, f"skip reasons {dict(rest)} not in {sorted(allowed)}"
    assert sum(rest.values()) == len(lost) + expect.extra[0], f"skips {dict(rest)} for lost {sorted(lost)}"


def _outcome(skips: Counter) -> str:
    reasons = sorted(r for r in skips if r != "replaced")
    return "skipped:" + "+".join(reasons) if reasons else "identical"


def _stream(root: Path, validate: str, workers: int, seed: int) -> MixedStream:
    return MixedStream([SourceSpec("fz", str(root))], micro_batch_size=2, validate=validate, num_workers=workers,
                       seed=seed)


def run_full(root: Path, expect: Expect, pristine: dict, workers: int, seed: int) -> tuple[str, set[str], Counter]:
    """Full validation: exact counts, then one epoch of exactly the surviving samples."""
    stream = _stream(root, "full", workers, seed)  # other shards stay intact: "no valid sample" is a failure here
    skips, valid = Counter(stream.stats()["skipped"]), set(stream.catalog.keys)
    assert len(valid) == len(stream.catalog.keys), "a key was cataloged twice"
    judge_catalog(expect, skips, valid, set(pristine))
    it = iter(stream)
    keys = [k for b in itertools.islice(it, (len(valid) + 1) // 2) for k in check_batch(b, pristine)]
    it.close()
    assert set(keys[: len(valid)]) == valid, "the first epoch is not exactly the surviving samples"
    assert Counter(stream.stats()["skipped"]) == skips, "full validation let a bad sample through to streaming"
    return _outcome(skips), valid, skips


def run_index(root: Path, full_valid: set[str], full_skips: Counter, pristine: dict, workers: int, seed: int) -> str:
    """Cheap validation: build-time skips a subset of full mode's; streaming delivers only surviving samples."""
    try:
        stream = _stream(root, "index", workers, seed)
    except ValueError as err:
        assert "no valid sample" in str(err) and not full_valid, err
        return "error:no valid sample"
    built = Counter(stream.stats()["skipped"])
    assert set(built) <= INDEX_LEVEL_REASONS and all(n <= full_skips[r] for r, n in built.items()), \
        f"index-mode skips {dict(built)} exceed full-mode skips {dict(full_skips)}"
    it = iter(stream)
    try:
        for batch in itertools.islice(it, len(pristine)):
            assert set(check_batch(batch, pristine)) <= full_valid, "index mode delivered a sample full mode rejects"
    except ValueError as err:  # allowed only where a bucket of the index-mode catalog holds no good sample at all
        dead = [b for b, ids in stream.catalog.by_bucket[0].items()
                if not {stream.catalog.keys[i] for i in ids} & full_valid]
        assert "every sample failed" in str(err) and dead, err
        return "error:every sample failed"
    finally:
        it.close()
    assert not full_valid or stream.stats()["seen"]["fz"] > 0
    found = Counter(stream.stats()["skipped"])
    assert set(found) - {"replaced"} <= set(full_skips), f"streaming skips {dict(found)} vs full {dict(full_skips)}"
    return _outcome(found)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the block runs longer than ``seconds`` (main thread, POSIX)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"fuzz case still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(case: int, seed: int, pristine_root: Path, pristine: dict, work: Path) -> dict:
    """Corrupt a fresh copy for ``case`` and judge both validate modes; returns the outcomes (raises on failure)."""
    name = KIND_NAMES[case % len(KIND_NAMES)]
    rng = random.Random(f"{seed}-{case}")
    root = work / f"case{case:05d}"
    shutil.copytree(pristine_root, root)
    workers = 2 if case % 4 == 0 else 0
    try:
        expect = KINDS[name](rng, Copy(root))
        with deadline(CASE_DEADLINE_S):
            full, valid, skips = run_full(root, expect, pristine, workers, seed)
            index = run_index(root, valid, skips, pristine, workers, seed)
    finally:
        shutil.rmtree(root)
    return {"case": case, "kind": name, "workers": workers, "full": full, "index": index}


def main() -> None:
    """Print per-kind outcome counts of ``--cases`` cases (the report the fuzz test's slow suite checks)."""
    import argparse
    import logging
    import tempfile

    from shard_factory import write_prepared_source

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--cases", type=int, default=350)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_prepared_source(tmp / "images", tmp / "pristine")
        pristine = pristine_samples(tmp / "pristine")
        table: dict[str, Counter] = {}
        for case in range(args.cases):
            out = run_case(case, args.seed, tmp / "pristine", pristine, tmp)
            table.setdefault(out["kind"], Counter()).update([f"full {out['full']}", f"index {out['index']}"])
    for name in KIND_NAMES:
        counts = table.get(name, Counter())
        print(f"{name:18s} {sum(counts.values()) // 2:4d}  " + "; ".join(f"{o} x{n}" for o, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
