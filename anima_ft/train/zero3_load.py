"""Loading an official file straight into ZeRO-3 partitions, so no rank ever holds the whole model.

Without this, every rank loads the whole file (4.18 GB of bf16 at full size) and DeepSpeed partitions it afterwards:
ZeRO-3 then peaked at 8.7-8.9 GiB per rank on CPU, above ZeRO-2 (docs/full_size_cpu.md#defects). Here the model
is constructed under ``deepspeed.zero.Init`` (each parameter is partitioned as soon as its module exists), then
filled one parameter at a time: the parameter is gathered, rank 0 copies the file's tensor into it, and leaving
``GatheredParameters`` broadcasts rank 0's values and re-partitions them. Every rank holds one full parameter at a
time at most. The file is checked exactly as ``load_anima`` checks it before anything is built.
"""

from __future__ import annotations

import logging

import deepspeed
import torch
import torch.distributed as dist

from anima_ft.model.dit import Anima
from anima_ft.model.state_dict import plan_anima_load, read_planned_tensors

logger = logging.getLogger(__name__)


def load_anima_partitioned(path: str, adapter_path: str | None, dtype: torch.dtype, ds_config: dict) -> Anima:
    """The model of ``path`` (+ ``adapter_path``) as ZeRO-3 partitioned parameters of ``dtype`` (collective)."""
    cfg, sources = plan_anima_load(path, adapter_path)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        model = Anima(cfg)
    rank = dist.get_rank()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sources))
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    tensors = read_planned_tensors(sources, list(params), dtype=dtype) if rank == 0 else None
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                got, value = next(tensors)
                assert got == name, (got, name)  # read_planned_tensors keeps the order of the names it is given
                param.data.copy_(value)
    logger.info("loaded %s into ZeRO-3 partitions (%d tensors; no rank held the whole model)", path, len(params))
    return model
