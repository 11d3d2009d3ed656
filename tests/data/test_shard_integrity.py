"""Index schema, checksums, v1 compatibility and the errors a user sees (the fuzz harness covers the whole class;
these pin the documented messages and counts)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shard_factory import FINGERPRINT, expected_sample, write_source

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.index_schema import BadIndex, _check_entry, _Checker, _entry_ok
from anima_ft.data.shard_format import TAR_BLOCK, index_path_for, read_index

BUCKETS = [(64, 32)]


@pytest.fixture
def shards(tmp_path):
    """Two shards of 4 samples each (``s-0000``, ``s-0001``) in one bucket; returns (dir, key -> bucket)."""
    keys = write_source(tmp_path / "s", "s", BUCKETS, num_shards=2, per_shard=4)
    return tmp_path / "s", keys


def _edit_index(tar, edit):
    ipath = index_path_for(tar)
    index = json.loads(ipath.read_text())
    edit(index)
    ipath.write_text(json.dumps(index))


def _keys(stream, n):
    return [k for b in itertools.islice(iter(stream), n) for k in b["key"]]


LIES = {  # the list: each makes the index unusable, named by the field
    "negative_span": (lambda ix: ix["samples"][1]["span"].__setitem__(0, -512), "samples[1].span[0]"),
    "float_offset": (lambda ix: ix["samples"][0]["members"]["json"].__setitem__(0, 0.0), "samples[0].members.json[0]"),
    "null_len": (lambda ix: ix["samples"][2].__setitem__("qwen_len", None), "samples[2].qwen_len"),
    "missing_key": (lambda ix: ix["samples"][3].pop("t5_len"), "samples[3].t5_len"),
    "huge_size": (lambda ix: ix["samples"][0]["members"]["text.safetensors"].__setitem__(1, 10**30),
                  "samples[0].members.text.safetensors[1]"),
    "string_bucket": (lambda ix: ix["samples"][0].__setitem__("bucket", ["64", 32]), "samples[0].bucket[0]"),
    "negative_bucket": (lambda ix: ix["samples"][0].__setitem__("bucket", [-64, 32]), "samples[0].bucket[0]"),
    "bool_tar_bytes": (lambda ix: ix.__setitem__("tar_bytes", True), "tar_bytes"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
@pytest.mark.parametrize("workers", [0, 1])
def test_lying_index_skips_the_shard_never_a_worker(shards, lie, workers, caplog):
    root, keys = shards
    edit, field = LIES[lie]
    _edit_index(root / "s-0000.tar", edit)
    with pytest.raises(BadIndex, match=field.replace("[", r"\[").replace("]", r"\]")):
        read_index(root / "s-0000.tar")
    with caplog.at_level(logging.WARNING, logger="anima_ft.data.sources"):
        stream = MixedStream([SourceSpec("s", str(root))], micro_batch_size=2, num_workers=workers)
    assert stream.stats()["skipped"] == {"unreadable_shard": 1}
    assert any("s-0000" in r.message and field in r.message for r in caplog.records)
    survivors = {k for k in keys if k.startswith("s_0001")}
    assert set(_keys(stream, 4)) == survivors  # two epochs of the intact shard, streamed through the workers


def test_nothing_usable_is_a_value_error_naming_shard_and_field(shards):
    root, _ = shards
    _edit_index(root / "s-0000.tar", LIES["negative_span"][0])
    index_path_for(root / "s-0001.tar").write_bytes(b'{"format": "anima_ft.shard", "x": "\xff"}')
    with pytest.raises(ValueError, match=r"(?s)no valid sample.*s-0000\.index\.json \(field samples\[1\]\.span\[0\].*"
                                         r"s-0001\.index\.json \(field \(file\): unreadable \(UnicodeDecodeError"):
        MixedStream([SourceSpec("s", str(root))], 1)


def test_missing_index_and_wrong_version_are_counted_and_named(shards, caplog):
    root, _ = shards
    _edit_index(root / "s-0000.tar", lambda ix: ix.__setitem__("format_version", 99))
    index_path_for(root / "s-0001.tar").unlink()
    with pytest.raises(ValueError, match=r"(?s)version 99.*has no index"):
        MixedStream([SourceSpec("s", str(root))], 1)


def test_bit_flip_in_caption_is_a_checksum_skip_in_both_modes(shards):
    root, keys = shards
    tar = root / "s-0000.tar"
    entry = read_index(tar)["samples"][2]
    data = bytearray(tar.read_bytes())
    start = entry["members"]["json"][0] + TAR_BLOCK
    data[data.index(b"caption of", start)] ^= 0x01  # "caption of" -> "baption of": a valid caption, but altered
    tar.write_bytes(bytes(data))
    full = MixedStream([SourceSpec("s", str(root))], micro_batch_size=2, validate="full")
    assert full.stats()["skipped"] == {"checksum_mismatch": 1}
    lazy = MixedStream([SourceSpec("s", str(root))], micro_batch_size=2)
    got = _keys(lazy, 16)
    assert entry["key"] not in got and set(got) == set(keys) - {entry["key"]}
    assert lazy.stats()["skipped"]["checksum_mismatch"] == lazy.stats()["skipped"]["replaced"] >= 1


def test_v1_shards_load_with_one_warning_and_the_same_samples(shards, caplog):
    root, keys = shards
    for tar in sorted(root.glob("*.tar")):
        def to_v1(ix):
            ix["format_version"] = 1
            del ix["checksum"]
            for e in ix["samples"]:
                del e["checksums"]
        _edit_index(tar, to_v1)
    with caplog.at_level(logging.WARNING, logger="anima_ft.data"):
        stream = MixedStream([SourceSpec("s", str(root))], micro_batch_size=2, validate="full")
    warnings = [r for r in caplog.records if "format v1" in r.message]
    assert len(warnings) == 1 and "2 of 2 shards" in warnings[0].message
    batch = next(iter(stream))
    for b, key in enumerate(batch["key"]):
        assert (batch["latents"][b] == expected_sample(key, keys[key])["latent"]).all()


def test_v1_and_v2_shards_of_one_encoder_mix(shards):
    root, _ = shards
    shutil.copy(root / "s-0000.tar", root / "v1-0000.tar")
    index = json.loads(index_path_for(root / "s-0000.tar").read_text())
    index = {**index, "format_version": 1, "samples": [{k: v for k, v in e.items() if k != "checksums"}
                                                       for e in index["samples"]]}
    del index["checksum"]
    index_path_for(root / "v1-0000.tar").write_text(json.dumps(index))
    stream = MixedStream([SourceSpec("s", str(root))], micro_batch_size=2, validate="full")
    assert len(stream.catalog) == 12 and stream.catalog.checksummed == [True, True, False]
    assert stream.fingerprint == FINGERPRINT


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.sampled_from([0, 8, 512, 1024, 2**53]),
                   st.floats(allow_nan=True), st.text(max_size=20), st.lists(st.integers(0, 4096), max_size=3))


def _child(node, key, missing=None):
    """node[key] when node is a dict holding key or a list long enough for an int key, else ``missing``."""
    if isinstance(node, dict) and key in node:
        return node[key]
    if isinstance(node, list) and isinstance(key, int) and key < len(node):
        return node[key]
    return missing


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fast_and_detailed_entry_checks_agree(shards, data):
    """The index check's fast path (no strings built) accepts exactly what the field-naming path accepts."""
    root, _ = shards
    index = read_index(root / "s-0000.tar")
    entry = json.loads(json.dumps(index["samples"][1]))
    for _ in range(data.draw(st.integers(0, 3))):
        path = data.draw(st.sampled_from([("key",), ("bucket",), ("bucket", 0), ("qwen_len",), ("t5_len",),
                                          ("span", 0), ("span", 1), ("members", "json", 0),
                                          ("members", "text.safetensors", 1), ("checksums", "json"), ("members",),
                                          ("checksums",), ("span",)]))
        target = entry
        for p in path[:-1]:
            target = _child(target, p)
        if _child(target, path[-1], missing=False) is not False:
            target[path[-1]] = data.draw(VALUES)
    prev_end = index["samples"][0]["span"][1]
    fast_ok = _entry_ok(entry, 2, prev_end, index["tar_bytes"], {"s_0000_0000"}) >= 0
    try:
        _check_entry(_Checker("x"), 1, entry, 2, prev_end, index["tar_bytes"], {"s_0000_0000"})
        detailed_ok = True
    except BadIndex:
        detailed_ok = False
    assert fast_ok == detailed_ok, entry
