"""The distillation objective through the real ``Trainer`` (DeepSpeed ZeRO-2, one gloo rank) with ``distill.enabled``:
``build_objective`` builds it once between model and engine, ``set_stage`` follows the stage transitions.

Recipe: configs/tiny_cpu_staged.yaml (stage 1: adapter LR 0, stage 2: adapter trains), synthetic data (source
``synthetic``), adapter source ``reinit``: stage 1 distills into the DiT with the frozen re-initialized adapter, stage
2 keeps distilling with the ``own`` (now trainable) adapter.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(run_dir: str):
    from anima_ft.config import load_config
    from anima_ft.config.distill import DistillStage
    from anima_ft.distill import DistillConfig, SourceLoss

    cfg = load_config(REPO / "configs" / "tiny_cpu_staged.yaml",
                      [f"run.dir={run_dir}", "checkpoint.every_steps=0", "checkpoint.save_at_end=false",
                       "stages.0.num_steps=6", "stages.1.num_steps=2"])
    cfg.distill = DistillConfig(enabled=True, adapter_source="reinit", reinit_seed=3,
                                losses=[SourceLoss("synthetic", "distill", 1.0)],
                                stages=[DistillStage(), DistillStage(adapter_source="reinit")])
    return cfg


def _worker(rank: int, port: int, run_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", WANDB_MODE="disabled")
    torch.set_num_threads(1)
    import anima_ft.train.trainer as trainer_mod
    from anima_ft.train.distributed import init_distributed

    cfg = _configs(run_dir)
    env = init_distributed("gloo", timeout_s=120)
    try:
        assert trainer_mod.Trainer(cfg, env).train() == "done"
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distill_through_the_trainer(tmp_path):
    """Step 1's logged loss equals the objective computed directly on the trainer's first batch and generator."""
    from anima_ft.observability import read_metrics
    from anima_ft.train.batches import build_stream
    from anima_ft.train.objective import build_objective, noise_generator
    from anima_ft.train.trainer import build_model

    mp.spawn(_worker, args=(_port(), str(tmp_path / "run")), nprocs=1, join=True)
    m = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(m) == list(range(1, 9))
    assert all(m[s]["lr/llm_adapter"] == 0.0 for s in range(1, 7)) and m[8]["lr/llm_adapter"] > 0
    assert all(0 < m[s]["loss"] < 1 for s in m)

    cfg = _configs(str(tmp_path / "direct"))
    model = build_model(cfg)
    objective = build_objective(cfg, model, {}, "cpu")
    batch = next(iter(build_stream(cfg, model.cfg.adapter.source_dim, 0, 1)))
    out = objective(model, batch, noise_generator(cfg.run.seed, 0, 0))
    assert m[1]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
