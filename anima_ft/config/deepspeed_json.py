"""Generate the DeepSpeed config dict from our :class:`Config` (never kept by hand beside it)."""

from __future__ import annotations

import copy
import logging
from typing import Any

from .schema import Config

logger = logging.getLogger(__name__)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any], path: str = "") -> list[str]:
    """Merge ``extra`` into ``base`` in place; returns the dotted keys that were set."""
    changed = []
    for key, value in extra.items():
        full = f"{path}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            changed += _deep_merge(base[key], value, full + ".")
        else:
            base[key] = copy.deepcopy(value)
            changed.append(full)
    return changed


DEFAULT_BUCKET = 50_000_000

OWNED_KEYS = {
    "train_batch_size": "batch.micro_batch_size x batch.grad_accum_steps x world size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "dist.zero_stage",
    "bf16.enabled": "dist.precision",
    "fp16.enabled": "dist.precision (fp16 is not supported)",
}
"""DeepSpeed keys generated from config fields: an override may repeat their value but not contradict it (the
trainer and the data stream use the config's batch arithmetic, so a different DeepSpeed value would silently
disagree with them)."""


def _lookup(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _agrees(value: Any, want: Any) -> bool:
    if isinstance(value, bool) or isinstance(want, bool):
        return value is want
    return value == want


def _check_sections(overrides: dict[str, Any], generated: dict[str, Any], path: str) -> None:
    """An override may not replace a generated section (a dict) with a non-dict."""
    for key, value in overrides.items():
        full = f"{path}{key}"
        if isinstance(generated.get(key), dict):
            if not isinstance(value, dict):
                raise ValueError(f"dist.deepspeed_overrides.{full}={value!r} replaces the generated DeepSpeed section "
                                 f"{full!r} (a mapping); override its keys instead, e.g. {full}.<key>=...")
            _check_sections(value, generated[key], full + ".")


def check_overrides(cfg: Config, world_size: int) -> None:
    """Raise ValueError when ``dist.deepspeed_overrides`` contradicts the config: a config-owned key
    (``OWNED_KEYS``) set to another value, or a generated section replaced by a non-mapping."""
    overrides = dict(cfg.dist.deepspeed_overrides)
    if not overrides:
        return
    generated = _generated(cfg, world_size)
    _check_sections(overrides, generated, "")
    for dotted, owner in OWNED_KEYS.items():
        present, value = _lookup(overrides, dotted)
        want = _lookup(generated, dotted)[1]
        if present and not _agrees(value, want):
            raise ValueError(f"dist.deepspeed_overrides.{dotted}={value!r} contradicts the config, which gives "
                             f"{want!r} from {owner}; set {owner.split(' (')[0]} instead and drop the override")


def build_deepspeed_config(cfg: Config, world_size: int, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for ``deepspeed.initialize``; ``dist.deepspeed_overrides`` is merged last and logged.

    ZeRO communication buckets are 50M elements, capped at ``num_params`` when given: DeepSpeed allocates a full
    bucket per step, which made a tiny model about 4x slower on CPU.

    Learning rates and schedules are driven by the trainer (per group, per stage), so no ``optimizer`` or
    ``scheduler`` section is generated: the trainer passes a torch AdamW, which needs no compiled DeepSpeed op.
    """
    ds = _generated(cfg, world_size, num_params)
    if cfg.dist.deepspeed_overrides:
        changed = _deep_merge(ds, dict(cfg.dist.deepspeed_overrides))
        logger.warning("dist.deepspeed_overrides set DeepSpeed keys: %s", ", ".join(changed))
    return ds


def _generated(cfg: Config, world_size: int, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed dict before ``dist.deepspeed_overrides`` are merged."""
    d, b = cfg.dist, cfg.batch
    bucket = DEFAULT_BUCKET if num_params is None else max(1, min(DEFAULT_BUCKET, int(num_params)))
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if d.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=100_000,
            stage3_prefetch_bucket_size=bucket,
            stage3_gather_16bit_weights_on_model_save=False,  # export reads the fp32 shards on CPU instead
        )
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": b.grad_accum_steps,
        "train_batch_size": b.micro_batch_size * b.grad_accum_steps * world_size,
        "gradient_clipping": float(d_clip) if (d_clip := cfg.optim.grad_clip) else 0.0,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return ds
