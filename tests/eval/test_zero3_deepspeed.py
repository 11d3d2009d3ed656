"""Probe, drift and sample grid on a real DeepSpeed ZeRO-3 engine: 2 CPU ranks (see zero3_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("zero3_worker.py")


@pytest.mark.slow
@pytest.mark.multiproc
def test_eval_hooks_on_zero3_engine(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(WORKER)]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "rank 0 OK" in res.stdout and "rank 1 OK" in res.stdout
