"""``python launch/train.py --config <bad>`` exits 2 with one log line, before any process group or model exists."""

from __future__ import annotations

import os
import subprocess
import sys

from config_helpers import REPO


def test_bad_config_exits_2_with_one_line(tmp_path):
    """The reported case: a NaN learning rate used to train to rc 0 (one process start, about 10 s)."""
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: {mlp: .nan}\n")
    overrides, needle = ["optim.eps=1.0e-8"], "optim.lr.mlp=nan is not a finite number"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(path), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "bad config: " in lines[0] and needle in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing was written
