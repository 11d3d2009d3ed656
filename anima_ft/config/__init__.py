"""Training config: schema (dataclasses), loader (defaults < YAML < dotlist), validation, DeepSpeed JSON."""

from .deepspeed_json import build_deepspeed_config
from .loader import load_config, to_dict, to_yaml
from .schema import PARAM_GROUPS, Config, GroupLRs, StageConfig
from .validate import effective_lrs, global_batch_size, validate

__all__ = [
    "PARAM_GROUPS",
    "Config",
    "GroupLRs",
    "StageConfig",
    "build_deepspeed_config",
    "effective_lrs",
    "global_batch_size",
    "load_config",
    "to_dict",
    "to_yaml",
    "validate",
]
