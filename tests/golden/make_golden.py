"""Regenerate the golden loss files in this folder (run from the repository root, CPU, deliberately):

    python tests/golden/make_golden.py

Each golden run is one plain ``python launch/train.py`` process (fp32, deterministic, synthetic data) whose
per-step losses are stored as ``<name>.json``. ``tests/golden/test_golden_losses.py`` reruns the same commands and
compares. Regenerate only for an intended numerical change, and say why in the commit message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# name -> launch/train.py arguments (run.dir is added); kept short so the check costs seconds
RUNS = {
    "tiny_cpu": ["--config", "configs/tiny_cpu.yaml", "num_steps=8", "checkpoint.every_steps=0",
                 "checkpoint.save_at_end=false"],
    "tiny_cpu_staged": ["--config", "configs/tiny_cpu_staged.yaml", "checkpoint.every_steps=0",
                        "checkpoint.save_at_end=false"],
}


def run_losses(args: list[str], run_dir: Path) -> dict[int, float]:
    """Per-step losses of ``launch/train.py ARGS run.dir=RUN_DIR`` in one CPU process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args, f"run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"golden run failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and int(r["step"]) > 0}


def main() -> int:
    import torch

    for name, args in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            losses = run_losses(args, Path(tmp) / name)
        record = {"args": args, "torch": torch.__version__, "losses": {str(s): v for s, v in sorted(losses.items())}}
        (HERE / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: {len(losses)} steps, last loss {losses[max(losses)]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
