"""metrics.jsonl and wandb (observability/metrics.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from anima_ft.observability import MetricsWriter, read_metrics


def test_metrics_jsonl_last_row_wins(tmp_path):
    w = MetricsWriter(tmp_path, rank=0)
    w.log(1, {"loss": 1.0})
    w.log(2, {"loss": 0.5})
    w.log(2, {"loss": 0.25})  # re-logged after a resume
    w.close()
    assert MetricsWriter(tmp_path / "other", rank=1).enabled is False
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert m == {1: {"step": 1, "loss": 1.0}, 2: {"step": 2, "loss": 0.25}}


def test_wandb_not_imported_when_disabled(tmp_path):
    code = (
        "import sys; from anima_ft.observability import MetricsWriter; "
        f"w = MetricsWriter({str(tmp_path)!r}, 0, 'disabled'); w.log(1, {{'x': 1}}); w.close(); "
        "assert 'wandb' not in sys.modules, 'wandb imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_wandb_offline_resumes_same_run_id(tmp_path):
    code = (
        "from anima_ft.observability import MetricsWriter; import pathlib; "
        f"w = MetricsWriter(pathlib.Path({str(tmp_path)!r}), 0, 'offline', config={{'a': 1}}); "
        "w.log(1, {'loss': 1.0}); print('RUNID', w._wandb.id); w.close()"
    )
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ids = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True,
                             env=env, cwd=str(tmp_path)).stdout
        ids.append(out.split("RUNID", 1)[1].split()[0])
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1
