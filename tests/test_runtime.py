"""Atomic writes (anima_ft/runtime.py): the target holds the old or the new content, never a mix or a leftover."""

from __future__ import annotations

import json

import pytest

from anima_ft import runtime


def test_atomic_writes_replace_the_content_and_leave_no_temporary(tmp_path):
    path = tmp_path / "latest"
    runtime.atomic_write_text(path, "step_00000001")
    runtime.atomic_write_text(path, "step_00000002")
    runtime.write_json_atomic(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert path.read_text() == "step_00000002"
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "x.json"]


@pytest.mark.parametrize("writer", ["stream", "file_name"])
def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, writer):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    def save_then_fail(name):
        open(name, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        if writer == "stream":
            runtime.atomic_write(path, half_then_fail)
        else:
            runtime.atomic_save_with(path, save_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
