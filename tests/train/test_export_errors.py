"""``anima-ft export`` on damaged ZeRO checkpoints: exit 2 with one stderr line naming the damaged file, never a
traceback; the pristine checkpoint exports bitwise to the bf16 of its fp32 masters.

The checkpoint is real: a world-of-one ZeRO-2 run of configs/tiny_cpu.yaml for 2 steps (plain ``python
launch/train.py``), made once per session. Shards are truncated at seeded random offsets or deleted, trainer.json and
``latest`` are garbled.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from anima_ft import cli
from anima_ft.train.export import fp32_state_dict
from tests.distributed.conftest import REPO, TRAIN, run_env

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
TAG = "step_00000002"


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory):
    """A run directory holding checkpoints/step_00000002 of a 2-step world-of-one ZeRO-2 run."""
    run = tmp_path_factory.mktemp("export_src") / "run"
    args = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"run.dir={run}", "num_steps=2",
            "checkpoint.every_steps=2"]
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (run / "checkpoints" / TAG / "trainer.json").is_file()
    return run


@pytest.fixture()
def copy(zero_run, tmp_path):
    """A private copy of the run (the damage stays in this test)."""
    run = tmp_path / "run"
    shutil.copytree(zero_run, run)
    return run


def _export(capsys, source, out) -> tuple[int, str]:
    rc = cli.main(["export", str(source), str(out)])
    return rc, capsys.readouterr().err


def _assert_one_line_naming(rc, err, named, out):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("anima-ft export: error: ") and str(named) in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow  # DeepSpeed's reader; the export round trip is in the default suite in tests/distributed
def test_pristine_exports_the_masters_in_bf16(copy, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rc, err = _export(capsys, copy, out)
    assert rc == 0, err
    ref = fp32_state_dict(copy / "checkpoints" / TAG)
    got = load_file(str(out))
    assert got.keys() == {"net." + k for k in ref}
    assert all(torch.equal(got["net." + k], v.to(torch.bfloat16)) for k, v in ref.items())


def _truncate(path, rng) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: rng.choice([0, 1, rng.randrange(2, len(raw) - 1), len(raw) - 1])])


@pytest.mark.parametrize("name", [OPTIM, MODEL])
@pytest.mark.parametrize("seed", range(3))
def test_truncated_shard(copy, tmp_path, capsys, name, seed):
    shard = copy / "checkpoints" / TAG / name
    _truncate(shard, random.Random(f"{name}{seed}"))
    out = tmp_path / "out.safetensors"
    _assert_one_line_naming(*_export(capsys, copy, out), shard, out)


@pytest.mark.parametrize("name", [OPTIM, MODEL])
def test_deleted_shard(copy, tmp_path, capsys, name):
    ckpt = copy / "checkpoints" / TAG
    (ckpt / name).unlink()
    out = tmp_path / "out.safetensors"
    _assert_one_line_naming(*_export(capsys, ckpt, out), ckpt / name if name == MODEL else ckpt, out)


def test_missing_rank_shard_is_named(copy, tmp_path, capsys):
    """trainer.json says 2 ranks saved the checkpoint; rank 1's optimizer shard is absent."""
    tj = copy / "checkpoints" / TAG / "trainer.json"
    tj.write_text(json.dumps(dict(json.loads(tj.read_text()), world_size=2)))
    out = tmp_path / "out.safetensors"
    _assert_one_line_naming(*_export(capsys, copy, out), "zero_pp_rank_1_mp_rank_00_optim_states.pt", out)


GARBLED = {
    "truncated_json": lambda s: s[: len(s) // 2],
    "not_an_object": lambda s: "[1, 2]",
    "not_utf8": lambda s: b"\xff\xfe\x00{",
    "no_model_config": lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "model_config"}),
    "step_is_text": lambda s: json.dumps(dict(json.loads(s), step="2")),
    "bad_model_config": lambda s: json.dumps(dict(json.loads(s), model_config=dict(json.loads(s)["model_config"],
                                                                                    num_blocks="two"))),
}


@pytest.mark.parametrize("how", sorted(GARBLED))
def test_garbled_trainer_json(copy, tmp_path, capsys, how):
    tj = copy / "checkpoints" / TAG / "trainer.json"
    new = GARBLED[how](tj.read_text())
    tj.write_bytes(new if isinstance(new, bytes) else new.encode())
    out = tmp_path / "out.safetensors"
    _assert_one_line_naming(*_export(capsys, copy, out), tj, out)


def test_garbled_latest_file(copy, tmp_path, capsys):
    latest = copy / "checkpoints" / "latest"
    latest.write_bytes(b"\x80\x81step")
    out = tmp_path / "out.safetensors"
    _assert_one_line_naming(*_export(capsys, copy, out), latest, out)


def test_subprocess_prints_one_line_and_no_traceback(copy, tmp_path):
    shard = copy / "checkpoints" / TAG / OPTIM
    _truncate(shard, random.Random(7))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "anima_ft.cli", "export", str(copy), str(out)], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("anima-ft export: error: " + str(shard)), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
