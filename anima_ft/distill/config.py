"""The distillation config now lives in the config layer (``anima_ft.config.distill``); this module re-exports it for
the modules of this package that still import ``.config`` (objective, build, context, lab_variant)."""

from anima_ft.config.distill import (
    ADAPTER_SOURCES,
    LOSS_KINDS,
    MODEL_ADAPTER_SOURCES,
    PERTURB_BASES,
    TEACHER_MODES,
    DistillConfig,
    DistillStage,
    SourceLoss,
    check_losses,
    stage_settings,
    validate_distill,
)

__all__ = [
    "ADAPTER_SOURCES",
    "LOSS_KINDS",
    "MODEL_ADAPTER_SOURCES",
    "PERTURB_BASES",
    "TEACHER_MODES",
    "DistillConfig",
    "DistillStage",
    "SourceLoss",
    "check_losses",
    "stage_settings",
    "validate_distill",
]
