"""`anima-ft verify`: per-reason report, exit codes (0 good, 1 bad data, 2 usage / no shards), progress bar."""

from __future__ import annotations

import json

from shard_factory import write_source

from anima_ft.cli import main as cli_main
from anima_ft.data.shard_format import TAR_BLOCK, index_path_for, read_index


def _shards(tmp_path):
    write_source(tmp_path / "d", "d", [(64, 32), (32, 64)], num_shards=3, per_shard=5)
    return tmp_path / "d"


def test_clean_shards_pass(tmp_path, capsys):
    root = _shards(tmp_path)
    assert cli_main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "3 shards (0 unreadable), 15 samples: 15 good, 0 bad" in out and "result: all good" in out


def test_damage_is_reported_per_reason_with_exit_1(tmp_path, capsys):
    root = _shards(tmp_path)
    tar0, tar1 = root / "d-0000.tar", root / "d-0001.tar"
    index0 = read_index(tar0)
    data = bytearray(tar0.read_bytes())
    for i in (1, 3):  # two tensor bit flips and one tar header flip
        data[index0["samples"][i]["members"]["latent.safetensors"][0] + TAR_BLOCK + 200] ^= 0x10
    data[index0["samples"][4]["members"]["text.safetensors"][0] + 3] ^= 0x01
    tar0.write_bytes(bytes(data))
    with open(tar1, "r+b") as f:  # cut the last sample short
        f.truncate(read_index(tar1)["samples"][-1]["span"][1] - 100)
    ipath = index_path_for(root / "d-0002.tar")
    ipath.write_text(ipath.read_text().replace('"qwen_len": ', '"qwen_len": -', 1))
    assert cli_main(["verify", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == {"checksum_mismatch": 2, "corrupt_member": 1, "truncated": 1, "size_mismatch": 1,
                                  "unreadable_shard": 1}
    assert report["samples"] == 10 and report["good_samples"] == 6 and report["unreadable_shards"] == 1
    assert "samples[0].qwen_len" in report["examples"]["unreadable_shard"][0]
    assert cli_main(["verify", str(root), "--index-only"]) == 1  # indices and sizes alone already show damage
    text = capsys.readouterr().out
    assert "truncated: 1" in text and "checksum_mismatch" not in text


def test_usage_and_no_shards_exit_2(tmp_path, capsys):
    assert cli_main(["verify"]) == 2
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert "no .tar shards found" in capsys.readouterr().err


def test_progress_bar_reaches_the_end(tmp_path, capsys):
    root = _shards(tmp_path)
    total = sum(t.stat().st_size for t in root.glob("*.tar"))
    assert cli_main(["verify", str(root), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "verify: 100%" in err and f"{total / 1000:.1f}k/{total / 1000:.1f}k" in err
