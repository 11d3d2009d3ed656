"""Build the distillation objective for the trainer, in the trainer's fixed order.

Call :func:`build_distill` after the student model is built and BEFORE ``deepspeed.initialize``: the teacher is copied
from (or loaded like) the untouched student, then a ``reinit``/``small`` adapter source replaces the student's
adapter so that the engine partitions and optimizes the new one. Returns None when ``distill.enabled`` is false, in
which case the trainer keeps the flow objective (``anima_ft.train.objective.build_objective``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from anima_ft.config.distill import DistillConfig
from anima_ft.config.schema import Config

from .context import prepare_student
from .objective import DistillObjective
from .precompute import VelocityStore
from .teacher import Teacher, load_teacher, partition_teacher

logger = logging.getLogger(__name__)


def build_teacher(cfg: Config, dcfg: DistillConfig, student: nn.Module, ds_config: dict,
                  device: torch.device | str) -> Teacher | VelocityStore:
    """The teacher of ``dcfg.teacher``: a store, a ZeRO-3 engine, or a replicated frozen module on ``device``.

    The live teacher is ``distill.teacher_path`` if set, else ``model.init_path`` (with ``model.adapter_path``), else
    a copy of the (random-init) student as it is now.
    """
    if dcfg.teacher == "precomputed":
        return VelocityStore(dcfg.precomputed_dir)
    dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
    path = dcfg.teacher_path or cfg.model.init_path
    if path:
        adapter = None if dcfg.teacher_path else (cfg.model.adapter_path or None)
        module = load_teacher(path, adapter, device="cpu", dtype=dtype, attention_backend=cfg.model.attention_backend)
    else:
        module = Teacher.from_model(student).module
    if dcfg.teacher_zero3:
        return partition_teacher(module, ds_config)
    return Teacher(module.to(device))


def build_distill(cfg: Config, dcfg: DistillConfig, student: nn.Module, ds_config: dict,
                  device: torch.device | str = "cpu") -> DistillObjective | None:
    """Build the teacher, apply the student's adapter source; the objective (None = disabled).

    ``dcfg`` was validated with the whole config (``anima_ft.config.validate``) before any rank started work.
    """
    if not dcfg.enabled:
        return None
    teacher = build_teacher(cfg, dcfg, student, ds_config, device)
    logger.info(prepare_student(student, dcfg))
    return DistillObjective(teacher, dcfg, cfg.objective, num_stages=max(1, len(cfg.stages)))
