"""Every command that reads model files answers a damaged file with one line on stderr and exit 2, never a
traceback (anima_ft/command_errors.py)."""

from __future__ import annotations

import pytest

from anima_ft.cli import main as anima_ft


@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return path


@pytest.mark.parametrize("argv", [
    ["drift", "{g}", "{g}"],
    ["probe", "{g}", "--eval-set", "x={g}", "--device", "cpu", "--out-dir", "{tmp}/probe"],
    ["swap", "--dit", "{g}", "--adapter", "{g}", "{tmp}/out.safetensors"],
    ["distill", "attribute", "--teacher", "{g}", "--student", "{g}", "--eval-set", "x={tmp}", "--device", "cpu"],
], ids=["drift", "probe", "swap", "distill"])
def test_damaged_model_file_is_one_line_and_exit_2(argv, garbage, tmp_path, capsys):
    rc = anima_ft([a.format(g=garbage, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"anima-ft {argv[0]}") and "Traceback" not in err[0], err
