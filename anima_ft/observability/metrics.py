"""Run logging: one logger setup, ``metrics.jsonl`` always, wandb on rank 0 when enabled, throughput estimates."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO, the others at WARNING, each line tagged with the rank."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_flops_per_sample(num_params: int, num_tokens: int, num_blocks: int, width: int, ctx_tokens: int) -> float:
    """Training FLOPs of one sample: 6 N T for the matmuls plus 12 L (T^2 + T C) D for attention (fwd + bwd).

    An estimate for MFU: it counts full backward through frozen weights as well (the activations need it).
    """
    return 6.0 * num_params * num_tokens + 12.0 * num_blocks * (num_tokens**2 + num_tokens * ctx_tokens) * width


class MetricsWriter:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl`` (rank 0); mirrors it to wandb.

    wandb is imported only when ``wandb_mode`` is not ``disabled``; the API key comes only from the environment;
    the run id is kept in ``run_dir/wandb_id`` so a restarted job resumes the same wandb run.
    """

    def __init__(self, run_dir: Path, rank: int, wandb_mode: str = "disabled", project: str = "anima_ft",
                 entity: str = "", name: str = "", config: dict[str, Any] | None = None):
        self.enabled = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(Path(run_dir), wandb_mode, project, entity, name, config or {})

    @staticmethod
    def _start_wandb(run_dir: Path, mode: str, project: str, entity: str, name: str, config: dict):
        import wandb  # only when used

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            logger.warning("logging.wandb_mode=online but WANDB_API_KEY is not set; wandb may fail to log in")
        return wandb.init(project=project, entity=entity or None, name=name or run_dir.name, id=run_id,
                          resume="allow", mode=mode, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step`` (no-op on ranks other than 0)."""
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        """Flush and close the file and the wandb run."""
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path) -> dict[int, dict]:
    """``{step: row}`` from a metrics.jsonl; a step logged twice (after a resume) keeps its last row."""
    out: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[int(row["step"])] = row
    return out
