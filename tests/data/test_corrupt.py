"""Fuzzed corrupt shards: every defect is skipped with the right reason and count, valid samples still stream."""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from shard_factory import FINGERPRINT, expected_sample

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.shard_format import EncodedSample, ShardWriter, encode_members, index_path_for

BUCKET = (64, 32)
DEFECTS = {  # defect -> reason the loader must count
    None: None,
    "drop_member": "missing_field",
    "no_caption": "missing_field",
    "garbage": "corrupt_member",
    "bad_header": "corrupt_member",
    "bad_shape": "bad_shape",
    "nan": "non_finite",
    "bad_t5": "bad_value",
}


def write_fuzzed_shard(path: Path, defects: list[str | None]) -> list[dict]:
    """One shard whose sample i carries ``defects[i]``; returns the index entries."""
    with ShardWriter(path, FINGERPRINT) as writer:
        for i, defect in enumerate(defects):
            key = f"fz_{i:04d}"
            ref = expected_sample(key, BUCKET)
            latent = ref["latent"]
            if defect == "bad_shape":
                latent = latent[:, :-1]
            if defect == "nan":
                latent = latent.clone()
                latent[0, 0, 0] = float("nan")
            t5 = torch.full_like(ref["t5_ids"], 40000) if defect == "bad_t5" else ref["t5_ids"]
            meta = {"caption": ref["caption"], "bucket": list(BUCKET)}
            if defect == "no_caption":
                meta = {"bucket": list(BUCKET)}
            members = encode_members(EncodedSample(key, latent, ref["qwen_states"], t5, meta))
            if defect == "drop_member":
                del members["latent.safetensors"]
            if defect == "garbage":
                members["text.safetensors"] = bytes(range(256)) * 2
            writer.add_raw(key, members, BUCKET, *ref["qwen_states"].shape, ref["t5_ids"].numel())
        index = writer.commit()
    with open(path, "r+b") as f:  # break the checksum of the json member's tar header
        for entry, defect in zip(index["samples"], defects):
            if defect == "bad_header":
                f.seek(entry["members"]["json"][0] + 10)
                f.write(b"\xff\xfe")
    return index["samples"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list(DEFECTS)), min_size=1, max_size=10), st.floats(0.0, 1.2))
def test_fuzzed_shard_counts_and_streams(defects, cut_fraction):
    root = Path(tempfile.mkdtemp())
    try:
        shard = root / "fz-0000.tar"
        entries = write_fuzzed_shard(shard, defects)
        size = shard.stat().st_size
        cut = int(size * cut_fraction)
        if cut < size:  # truncate the tar (the index still describes the full file)
            with open(shard, "r+b") as f:
                f.truncate(cut)
        expected, valid = Counter(), []
        for entry, defect in zip(entries, defects):
            if defect == "drop_member":
                expected["missing_field"] += 1
            elif entry["span"][1] > min(cut, size):
                expected["truncated"] += 1
            elif defect is not None:
                expected[DEFECTS[defect]] += 1
            else:
                valid.append(entry["key"])
        spec = [SourceSpec("fz", str(root))]
        if not valid:
            with pytest.raises(ValueError, match="no valid sample"):
                MixedStream(spec, 1, validate="full")
            return
        stream = MixedStream(spec, micro_batch_size=2, validate="full")
        assert stream.stats()["skipped"] == dict(expected)
        keys = [k for b in itertools.islice(iter(stream), len(valid)) for k in b["key"]]
        assert set(keys) == set(valid)  # two epochs of the valid samples, nothing else
        # cheap validation finds the rest while streaming, replacing each bad sample by a valid one
        lazy = MixedStream(spec, micro_batch_size=2, validate="index")
        lazy_keys = [k for b in itertools.islice(iter(lazy), 2 * len(defects)) for k in b["key"]]
        assert set(lazy_keys) == set(valid)
        found = lazy.stats()["skipped"]
        for reason in ("missing_field", "truncated"):
            if reason == "truncated" or not any(d == "no_caption" for d in defects):
                assert found.get(reason, 0) >= expected[reason]
        assert set(found) <= set(expected) | {"replaced", "missing_field"}
    finally:
        shutil.rmtree(root)


def test_missing_index_and_wrong_version_are_clear_errors(tmp_path):
    write_fuzzed_shard(tmp_path / "a-0000.tar", [None])
    ipath = index_path_for(tmp_path / "a-0000.tar")
    index = json.loads(ipath.read_text())
    ipath.write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        MixedStream([SourceSpec("a", str(tmp_path))], 1)
    ipath.unlink()
    with pytest.raises(ValueError, match="has no index"):
        MixedStream([SourceSpec("a", str(tmp_path))], 1)


def test_unwritable_tensors_never_reach_a_batch(tmp_path):
    """A latent stored as float32 garbage of the right byte size still fails the shape/dtype check."""
    with ShardWriter(tmp_path / "b-0000.tar", FINGERPRINT) as writer:
        ref = expected_sample("ok_0", BUCKET)
        writer.add(EncodedSample("ok_0", ref["latent"], ref["qwen_states"], ref["t5_ids"],
                                 {"caption": "c", "bucket": list(BUCKET)}))
        members = encode_members(EncodedSample("bad_0", ref["latent"], ref["qwen_states"], ref["t5_ids"],
                                               {"caption": "c", "bucket": list(BUCKET)}))
        members["latent.safetensors"] = st_save({"latent": torch.zeros(8, 4, 8)})
        writer.add_raw("bad_0", members, BUCKET, *ref["qwen_states"].shape, ref["t5_ids"].numel())
        writer.commit()
    stream = MixedStream([SourceSpec("b", str(tmp_path))], 1, validate="full")
    assert stream.stats()["skipped"] == {"bad_shape": 1}
