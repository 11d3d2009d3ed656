"""Parameter groups: the six LR groups users know, split again by weight decay.

Group by name (the official checkpoint names, docs/model.md#keys), as diffusion-pipe does:
``llm_adapter.*`` -> llm_adapter; ``.self_attn.`` / ``.cross_attn.`` / ``.mlp.`` -> their group;
``adaln_modulation`` -> mod; anything else (embedders, timestep MLP, final linear, t_embedding_norm) -> base.
``adaln_modulation_self_attn`` is "mod", not "self_attn": the attention groups require the dotted component.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from anima_ft.config.schema import PARAM_GROUPS
from anima_ft.model.groups import lr_group as group_of  # the one definition of the LR groups

_NO_DECAY = re.compile(r"(norm|embed)")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: not for norms, embeddings (patch/timestep/token) or 1-D tensors (biases).

    Uses the full shape (``ds_shape``) of ZeRO-3 partitioned parameters, whose local ``.data`` is flat.
    """
    return len(getattr(param, "ds_shape", param.shape)) >= 2 and not _NO_DECAY.search(name)


def group_key(group: str, decay: bool) -> str:
    """Name of one optimizer param group, e.g. ``mlp/decay``."""
    return f"{group}/{'decay' if decay else 'no_decay'}"


def apply_trainable(model: nn.Module, lrs: Mapping[str, float]) -> dict[str, int]:
    """Set ``requires_grad`` from the LRs (0 = frozen); returns trainable element counts per group."""
    counts = {g: 0 for g in PARAM_GROUPS}
    for name, p in model.named_parameters():
        g = group_of(name)
        p.requires_grad_(lrs[g] > 0)
        if lrs[g] > 0:
            counts[g] += numel(p)
    return counts


def numel(p: torch.Tensor) -> int:
    """Element count, also for ZeRO-3 partitioned parameters (whose ``.numel()`` is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], lrs: Mapping[str, float], weight_decay: float
) -> list[dict]:
    """Optimizer param groups for the trainable parameters only, in a fixed order (group, then decay).

    Each group dict carries ``name`` (``mlp/decay``), ``group`` (``mlp``), ``lr`` (peak) and ``weight_decay``.
    Frozen parameters (lr 0 or ``requires_grad=False``) are left out: no optimizer state is ever allocated.
    """
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, p in named_params:
        g = group_of(name)
        if lrs[g] <= 0 or not p.requires_grad:
            continue
        buckets.setdefault(group_key(g, decays(name, p)), []).append(p)
    out = []
    for g in PARAM_GROUPS:
        for decay in (True, False):
            key = group_key(g, decay)
            if key in buckets:
                out.append(
                    {"params": buckets[key], "name": key, "group": g, "lr": lrs[g],
                     "weight_decay": weight_decay if decay else 0.0}
                )
    return out
