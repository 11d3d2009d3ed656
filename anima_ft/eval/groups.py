"""Module groups for weight drift: official tensor names -> the groups users compare by hand.

Names are the official checkpoint names without prefix (``net.``, ``model.diffusion_model.`` and a DeepSpeed
``module.`` are stripped by :func:`strip_prefix`). Groups:

* ``llm_adapter.blocks.<j>`` for adapter block j, ``llm_adapter.embed`` (the T5 table), ``llm_adapter.out``
  (``out_proj`` and the final ``norm``);
* ``blocks.<i>.self_attn``, ``blocks.<i>.cross_attn``, ``blocks.<i>.mlp``, ``blocks.<i>.adaln`` for DiT block i;
* ``embedders`` (``x_embedder``, ``t_embedder``, ``t_embedding_norm``) and ``final_layer``.

Each group also belongs to a coarse *kind* (``llm_adapter``, ``self_attn``, ``cross_attn``, ``mlp``, ``adaln``,
``embedders``, ``final_layer``) used for compact training-time logging.
"""

from __future__ import annotations

import re

PREFIXES = ("module.", "net.", "model.diffusion_model.")
IGNORED_PATTERNS = (re.compile(r"(^|\.)pos_embedder\."), re.compile(r"(^|\.)accum_"), re.compile(r"_extra_state$"))

_DIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(self_attn|cross_attn|mlp|adaln_modulation_\w+?)\.")
_ADAPTER_BLOCK = re.compile(r"^llm_adapter\.blocks\.(\d+)\.")

KINDS = ("llm_adapter", "self_attn", "cross_attn", "mlp", "adaln", "embedders", "final_layer", "other")


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


def group_of(name: str) -> str:
    """The drift group of an (unprefixed) official tensor name, e.g. ``blocks.7.mlp.layer1.weight -> blocks.7.mlp``."""
    name = strip_prefix(name)
    if m := _ADAPTER_BLOCK.match(name):
        return f"llm_adapter.blocks.{m.group(1)}"
    if name.startswith("llm_adapter.embed"):
        return "llm_adapter.embed"
    if name.startswith("llm_adapter."):
        return "llm_adapter.out"
    if m := _DIT_BLOCK.match(name):
        part = m.group(2)
        return f"blocks.{m.group(1)}.{'adaln' if part.startswith('adaln') else part}"
    if name.startswith(("x_embedder.", "t_embedder.", "t_embedding_norm.")):
        return "embedders"
    if name.startswith("final_layer."):
        return "final_layer"
    return "other"


def kind_of(group: str) -> str:
    """Coarse kind of a group: ``blocks.3.mlp -> mlp``, ``llm_adapter.blocks.1 -> llm_adapter``."""
    if group.startswith("llm_adapter"):
        return "llm_adapter"
    if group.startswith("blocks."):
        return group.rsplit(".", 1)[1]
    return group


def group_sort_key(group: str) -> tuple:
    """Display order: embedders, DiT blocks in index order (self, cross, mlp, adaln), final layer, adapter."""
    parts = group.split(".")
    part_rank = {"self_attn": 0, "cross_attn": 1, "mlp": 2, "adaln": 3}
    if group == "embedders":
        return (0,)
    if parts[0] == "blocks":
        return (1, int(parts[1]), part_rank.get(parts[2], 9))
    if group == "final_layer":
        return (2,)
    if group == "llm_adapter.embed":
        return (3, -1)
    if group.startswith("llm_adapter.blocks."):
        return (3, int(parts[2]))
    if group == "llm_adapter.out":
        return (3, 10**6)
    return (9, group)
