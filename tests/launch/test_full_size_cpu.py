"""launch/bench/full_size_cpu.py: the refusal on too little memory or disk, and the tiny model through every phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anima_ft.train.memory_plan import checkpoint_bytes, rank_memory

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "bench" / "full_size_cpu.py"


def _run(out: Path, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


@pytest.mark.parametrize(("var", "what"), [("FULL_SIZE_MEM_AVAILABLE", "free memory"),
                                           ("FULL_SIZE_DISK_FREE", "free disk")])
def test_refuses_to_start_with_one_line_when_the_machine_is_too_small(tmp_path, var, what):
    plenty = {"FULL_SIZE_MEM_AVAILABLE": str(2**50), "FULL_SIZE_DISK_FREE": str(2**50)}  # the other check passes
    proc = _run(tmp_path / "out", env=dict(plenty, **{var: str(2**30)}))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln and "accelerator" not in ln]
    assert len(lines) == 1 and what in lines[0] and "1.0 GiB" in lines[0], proc.stderr
    assert list((tmp_path / "out").iterdir()) == []  # nothing written before the check


def test_memory_plan_terms():
    """The recipe header's arithmetic (configs/anima_full_h100x8.yaml): 2.09 B parameters, all trainable, 8 ranks."""
    total = 2_091_068_928
    z2 = rank_memory(total, total, world=8, zero_stage=2, runtime=0)
    assert z2["weights"] == 2 * total and z2["optimizer"] == 2 * total and z2["grads"] == 2 * total
    z3 = rank_memory(total, total, world=8, zero_stage=3, runtime=0)
    assert z3 == z2  # the whole file is loaded on every rank before DeepSpeed partitions it (the measured peak)
    assert checkpoint_bytes(total, 0) == 2 * total
    with pytest.raises(ValueError, match="trainable"):
        rank_memory(10, 11, world=1, zero_stage=2)


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_phase_at_tiny_size(tmp_path):
    """``--smoke``: the same phases on the tiny model, and the claims the full-size report makes, checked."""
    out = tmp_path / "fs"
    proc = _run(out, "--smoke", "--keep", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["done"] and res["resume_losses_equal"]
    assert set(res["resume_bitwise"]) == {"4", "5", "6"}
    ex = res["export"]
    assert ex["names_and_shapes_equal"] and ex["tensors"] == ex["loaded_by_load_anima"] == 89
    assert ex["frozen_bitwise_equal"] and ex["trained_groups_changed"] and ex["dtypes"] == ["BF16"]
    assert set(ex["changed_by_group"]) <= {"mod", "llm_adapter"}
    assert sorted(map(int, res["runs"]["universal_1rank"]["losses"])) == [7, 8]  # resumed at 6 on one rank
    assert res["runs"]["universal_1rank"]["convert_s"], "the 1-rank run did not go through the universal conversion"
    for s, (z3, z2) in res["zero3_vs_zero2"].items():
        assert abs(z3 - z2) <= 2e-3 * abs(z2), (s, z3, z2)
    assert any("stage 0 -> 1" in ln and "fresh state for ['llm_adapter']" in ln for ln in res["staged_log"])
    # a checkpoint's size is the plan's arithmetic plus small per-file overhead (pickle headers, RNG and data state)
    ckpt = next((out / "runs" / "zero2" / "checkpoints").glob("step_*"))
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    want = checkpoint_bytes(res["plan"]["params"], res["plan"]["trainable"])
    assert want <= size <= 1.1 * want + 2**20, (size, want)
    assert "| zero2 | 2 | 2 |" in (out / "results.md").read_text()
