"""Knowledge redistribution: distill what the LLM adapter knows into the DiT (teacher-student objective).

``DistillObjective`` replaces ``anima_ft.train.objective.compute_loss`` when ``distill.enabled``; the teacher is a
frozen copy of the starting model (replicated, ZeRO-3 partitioned, or precomputed to disk).

Names are resolved lazily (PEP 562) so that ``anima_ft.config.schema`` can import ``anima_ft.distill.config``
without importing the objective, which itself imports the config schema.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistillConfig": "config", "DistillStage": "config", "SourceLoss": "config", "validate_distill": "config",
    "ContextOverride": "context", "prepare_student": "context",
    "DistillLossOutput": "objective", "DistillObjective": "objective",
    "VelocityStore": "precompute", "write_teacher_velocities": "precompute",
    "Teacher": "teacher", "load_teacher": "teacher", "partition_teacher": "teacher",
    "teacher_deepspeed_config": "teacher",
    "build_distill": "build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anima_ft.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
