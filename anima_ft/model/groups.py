"""Tensor-name groups: one vocabulary for the learning-rate groups and the drift tables.

Names are the official checkpoint names without prefix (``net.``, ``model.diffusion_model.`` and a DeepSpeed
``module.`` are stripped by :func:`strip_prefix`).

The six **LR groups** (``PARAM_GROUPS``, the groups diffusion-pipe users know) decide learning rates and freezing:
``llm_adapter.*`` -> ``llm_adapter``; ``.self_attn.`` / ``.cross_attn.`` / ``.mlp.`` -> their group;
``adaln_modulation`` -> ``mod``; everything else (embedders, timestep MLP, final linear, t_embedding_norm) -> ``base``.
``adaln_modulation_self_attn`` is ``mod``, not ``self_attn``: the attention groups require the dotted component.

The **drift groups** are finer locations, each inside exactly one LR group (:func:`lr_group_of_drift_group`), so a
drift table can always be summed back into the LR groups:

* ``blocks.<i>.self_attn``, ``blocks.<i>.cross_attn``, ``blocks.<i>.mlp``, ``blocks.<i>.mod`` for DiT block i;
* ``embedders`` (``x_embedder``, ``t_embedder``, ``t_embedding_norm``; LR group ``base``);
* ``final_layer.mod`` (its adaLN modulation) and ``final_layer.linear`` (LR group ``base``);
* ``llm_adapter.blocks.<j>``, ``llm_adapter.embed`` (the T5 table), ``llm_adapter.out`` (``out_proj``, final norm).
"""

from __future__ import annotations

import re

from anima_ft.config.schema import PARAM_GROUPS

__all__ = ["PARAM_GROUPS", "drift_group", "group_sort_key", "is_ignored", "lr_group", "lr_group_of_drift_group",
           "strip_prefix"]

PREFIXES = ("module.", "net.", "model.diffusion_model.")
IGNORED_PATTERNS = (re.compile(r"(^|\.)pos_embedder\."), re.compile(r"(^|\.)accum_"), re.compile(r"_extra_state$"))

_LR_RULES = (
    ("llm_adapter", re.compile(r"^llm_adapter\.")),
    ("mod", re.compile(r"adaln_modulation")),
    ("self_attn", re.compile(r"(^|\.)self_attn\.")),
    ("cross_attn", re.compile(r"(^|\.)cross_attn\.")),
    ("mlp", re.compile(r"(^|\.)mlp\.")),
)
_DIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(self_attn|cross_attn|mlp|adaln_modulation_\w+?)\.")
_ADAPTER_BLOCK = re.compile(r"^llm_adapter\.blocks\.(\d+)\.")
_BLOCK_PARTS = ("self_attn", "cross_attn", "mlp", "mod")


def strip_prefix(name: str) -> str:
    """Remove any leading ``module.`` / ``net.`` / ``model.diffusion_model.`` (repeatedly, in any order)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def is_ignored(name: str) -> bool:
    """True for recomputable buffers and training counters (RoPE tables, ``accum_*``, ``*_extra_state``)."""
    return any(p.search(name) for p in IGNORED_PATTERNS)


def lr_group(name: str) -> str:
    """The LR group of a parameter name (one of ``PARAM_GROUPS``)."""
    for group, rule in _LR_RULES:
        if rule.search(name):
            return group
    return "base"


def drift_group(name: str) -> str:
    """The drift group of an official tensor name, e.g. ``blocks.7.mlp.layer1.weight -> blocks.7.mlp``."""
    name = strip_prefix(name)
    if m := _ADAPTER_BLOCK.match(name):
        return f"llm_adapter.blocks.{m.group(1)}"
    if name.startswith("llm_adapter.embed"):
        return "llm_adapter.embed"
    if name.startswith("llm_adapter."):
        return "llm_adapter.out"
    if m := _DIT_BLOCK.match(name):
        part = m.group(2)
        return f"blocks.{m.group(1)}.{'mod' if part.startswith('adaln') else part}"
    if name.startswith(("x_embedder.", "t_embedder.", "t_embedding_norm.")):
        return "embedders"
    if name.startswith("final_layer."):
        return "final_layer.mod" if "adaln_modulation" in name else "final_layer.linear"
    return "other"


def lr_group_of_drift_group(group: str) -> str:
    """The LR group a drift group lies in: ``blocks.3.mod -> mod``, ``llm_adapter.blocks.1 -> llm_adapter``,
    ``embedders -> base``; ``other`` (names outside the architecture) stays ``other``."""
    if group.startswith("llm_adapter"):
        return "llm_adapter"
    if group.startswith("blocks."):
        return group.rsplit(".", 1)[1]
    if group == "final_layer.mod":
        return "mod"
    if group in ("embedders", "final_layer.linear"):
        return "base"
    return "other"


def group_sort_key(group: str) -> tuple:
    """Display order: embedders, DiT blocks in index order (self, cross, mlp, mod), final layer, adapter."""
    parts = group.split(".")
    if group == "embedders":
        return (0,)
    if parts[0] == "blocks":
        return (1, int(parts[1]), _BLOCK_PARTS.index(parts[2]) if parts[2] in _BLOCK_PARTS else 9)
    if parts[0] == "final_layer":
        return (2, group)
    if group == "llm_adapter.embed":
        return (3, -1)
    if group.startswith("llm_adapter.blocks."):
        return (3, int(parts[2]))
    if group == "llm_adapter.out":
        return (3, 10**6)
    return (9, group)
