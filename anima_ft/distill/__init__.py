"""Knowledge redistribution: distill what the LLM adapter knows into the DiT (teacher-student objective).

``DistillObjective`` replaces the flow-matching objective when ``distill.enabled``; the teacher is a frozen copy of the
starting model (replicated, ZeRO-3 partitioned, or precomputed to disk). The config (``DistillConfig``) is defined in
the config layer, ``anima_ft.config.distill``, and re-exported here.
"""

from anima_ft.config.distill import DistillConfig, DistillStage, SourceLoss, validate_distill

from .build import build_distill
from .context import ContextOverride, prepare_student
from .objective import DistillLossOutput, DistillObjective
from .precompute import VelocityStore, write_teacher_velocities
from .teacher import Teacher, load_teacher, partition_teacher, teacher_deepspeed_config

__all__ = [
    "ContextOverride",
    "DistillConfig",
    "DistillLossOutput",
    "DistillObjective",
    "DistillStage",
    "SourceLoss",
    "Teacher",
    "VelocityStore",
    "build_distill",
    "load_teacher",
    "partition_teacher",
    "prepare_student",
    "teacher_deepspeed_config",
    "validate_distill",
    "write_teacher_velocities",
]
