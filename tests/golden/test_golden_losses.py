"""Golden per-step losses of named tiny runs (``make_golden.py`` beside this file wrote them).

A change anywhere in the path from synthetic data to the optimizer step (model math, objective, noise seeding,
learning-rate schedule, stage freezing, data order) moves these numbers. fp32 on CPU is deterministic here, so the
tolerance only absorbs vector-instruction differences between CPUs (rel 1e-5, far below one step's change).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden.make_golden import RUNS, run_losses

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_match_golden_file(name, tmp_path):
    golden = json.loads((HERE / f"{name}.json").read_text())
    assert golden["args"] == RUNS[name], f"{name}.json was made with other arguments: run make_golden.py"
    want = {int(s): v for s, v in golden["losses"].items()}
    got = run_losses(RUNS[name], tmp_path / name)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=0), (name, step, got[step], loss)
