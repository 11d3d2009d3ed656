"""Load the config: dataclass defaults < YAML file < ``key=value`` overrides, in OmegaConf struct mode.

Unknown keys fail before OmegaConf sees them, with the closest valid key in the message.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .schema import Config

_FREE_DICT_FIELDS = {"dist.deepspeed_overrides"}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass behind ``tp`` or behind ``list[tp]``; None for scalars."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _closest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def check_keys(tree: Any, cls: type = Config, prefix: str = "", where: str = "config") -> None:
    """Raise ValueError for the first key of ``tree`` (nested dict from YAML) that the schema does not have."""
    if not isinstance(tree, dict):
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got "
                         f"{type(tree).__name__}")
    types = _field_types(cls)
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in types:
            paths = [f"{prefix}{k}" for k in types]
            raise ValueError(f"{where}: unknown key {full!r}{_closest(full, paths)}")
        if full in _FREE_DICT_FIELDS:
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{where}: {full} must be a mapping, got {type(value).__name__}")
            continue
        if typing.get_origin(types[key]) is list and value is not None and not isinstance(value, list):
            raise ValueError(f"{where}: {full} must be a list, got {type(value).__name__} {value!r:.60}")
        sub = _dataclass_of(types[key])
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                check_keys(item, sub, f"{full}.{i}.", where)
        elif value is not None:
            check_keys(value, sub, f"{full}.", where)


def _check_dotted(key: str) -> None:
    """Validate an override path like ``stages.1.lr.llm_adapter`` against the schema."""
    cls: type | None = Config
    parts = key.split(".")
    i = 0
    prefix = ""
    while i < len(parts) and cls is not None:
        types = _field_types(cls)
        name = parts[i]
        if name not in types:
            paths = [f"{prefix}{k}" for k in types]
            raise ValueError(f"override: unknown key {prefix + name!r}{_closest(prefix + name, paths)}")
        prefix += name + "."
        if prefix.rstrip(".") in _FREE_DICT_FIELDS:
            return
        tp = types[name]
        cls = _dataclass_of(tp)
        if cls is not None and typing.get_origin(tp) is list:
            i += 1  # skip the list index
            if i < len(parts) and not parts[i].isdigit():
                raise ValueError(f"override: {key!r}: {prefix.rstrip('.')} is a list; address items as {prefix}0.<field>")
            prefix += (parts[i] + ".") if i < len(parts) else ""
        i += 1


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` -> ``[("a.b", 1), ...]``, values parsed as YAML; keys checked against the schema."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr.mlp=2e-5)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        _check_dotted(key)
        out.append((key, _parse_yaml(raw, f"override {key}") if raw != "" else ""))
    return out


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with syntax errors as ValueError naming ``where`` (file or override) and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: YAML syntax error{at}: {problem}; fix the YAML (quote strings with ':' or '#')") \
            from None


_DEFAULTS: list[DictConfig] = []


def _defaults() -> DictConfig:
    """A fresh struct-mode copy of the schema defaults (building them from the dataclasses takes ~7x longer)."""
    if not _DEFAULTS:
        base = OmegaConf.structured(Config)
        OmegaConf.set_struct(base, True)
        _DEFAULTS.append(base)
    return copy.deepcopy(_DEFAULTS[0])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the :class:`Config`: defaults < YAML at ``path`` < ``overrides`` (dotlist ``key=value``).

    Raises ValueError naming the bad key (with the closest valid one) or the bad value.
    """
    cfg = _defaults()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {path} is unreadable ({exc}); give a UTF-8 YAML file") from None
        tree = _parse_yaml(text, str(path))
        tree = {} if tree is None else tree
        check_keys(tree, where=str(path))
        try:
            with open_dict(cfg.dist.deepspeed_overrides):
                cfg = OmegaConf.merge(cfg, tree)
        except (OmegaConfBaseException, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"{path}: {_one_line(exc)}") from None
    for key, value in parse_overrides(list(overrides or [])):
        try:
            if key.startswith("dist.deepspeed_overrides"):
                with open_dict(cfg.dist.deepspeed_overrides):
                    OmegaConf.update(cfg, key, value, force_add=True)
            else:
                OmegaConf.update(cfg, key, value)
        except (OmegaConfBaseException, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"override {key}={value!r}: {_one_line(exc)}") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        raise ValueError(f"config: {_one_line(exc)}") from None
    assert isinstance(obj, Config)
    return obj


def _one_line(exc: BaseException) -> str:
    """OmegaConf messages span lines (``full_key: ...``, ``object_type=...``); keep them on one log line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (dumped into the run dir, wandb and export metadata)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain containers."""
    return dataclasses.asdict(cfg)
