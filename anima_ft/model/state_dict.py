"""Official checkpoint format <-> our module: build, load and save Anima single-file safetensors (docs/model.md#keys).

The official file holds the DiT under ``net.`` and the adapter under ``net.llm_adapter.`` in bf16. We also accept the
native ComfyUI prefix ``model.diffusion_model.`` and no prefix, an adapter in a separate file, and we drop derived
buffers (``pos_embedder.*`` RoPE tables, NVIDIA's ``accum_*`` counters, ``*._extra_state``), which are recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anima_ft.runtime import atomic_save_with

from .config import AnimaConfig, check_layout, inspect_layout, shape_field_differences
from .dit import Anima
from .groups import is_ignored

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "net."
_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")
CONFIG_METADATA_KEY = "anima_ft.config"


def strip_prefix(name: str) -> str:
    """Internal name of an official key: drop ``net.`` / ``model.diffusion_model.`` if present."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def build_anima(
    cfg: AnimaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = 0
) -> Anima:
    """Construct Anima directly on ``device`` (``meta`` allocates nothing), with a seeded random init."""
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = Anima(cfg)
    return model.to(dtype) if str(device) != "meta" else model


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}
_TORCH_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.complex64: "C64"}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``BF16``), as ``check_layout`` expects."""
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: ``tensors[key] = (dtype, shape)`` and the string metadata."""

    tensors: dict[str, tuple[str, list[int]]]
    metadata: dict[str, str]


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys {dup}")
    return dict(pairs)


def _entry_problem(entry: object) -> str | None:
    """Why a header entry is not ``{"dtype": known, "shape": [ints >= 0], "data_offsets": [b, e]}`` sized right."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "is not a {dtype, shape, data_offsets} entry"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        return f"has unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has a malformed shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"has malformed data_offsets {offsets!r}"
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
        return (f"has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes) for shape {shape} {dtype} "
                f"({numel * _DTYPE_BYTES[dtype]} bytes)")
    return None


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without reading any tensor data.

    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file (and the tensor, where there is one) for a
    file too short to be safetensors, a header that is not UTF-8 JSON, an entry with an unknown dtype or a shape that
    disagrees with its byte range, byte ranges with gaps or overlaps, and a file shorter (truncated) or longer than
    its tensors need: the rules the safetensors library applies, checked up front with a message that says which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(raw, "little")
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ is not a string -> string map)")
    spans = []
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} {problem}")
        spans.append((*entry["data_offsets"], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} starts at data byte {begin}, "
                             f"expected {end} (byte ranges overlap or leave a gap)")
        end = stop
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    if 8 + n + end < size:
        raise ValueError(f"{path}: corrupt safetensors file: {size - 8 - n - end} bytes follow the last tensor")
    return SafetensorsHeader({k: (v["dtype"], list(v["shape"])) for k, v in header.items()}, metadata)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` read from the header only (validated by :func:`read_header`)."""
    return read_header(path).tensors


def stored_config(path: str | os.PathLike, metadata: Mapping[str, str]) -> AnimaConfig | None:
    """The config :func:`save_anima` stored in ``metadata`` (None if absent); ValueError naming the file if bad."""
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return AnimaConfig.from_dict(json.loads(text))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: metadata key {CONFIG_METADATA_KEY!r} holds no valid Anima config ({exc}); re-save "
                         "the file with save_anima, or drop the key to infer the config from the tensor "
                         "shapes") from exc


_Source = tuple[Path, str, str, list[int]]  # (file, key in the file, dtype, shape)


def _collect(path: Path, header: SafetensorsHeader, adapter_only: bool) -> dict[str, _Source]:
    """Map internal name -> (file, key, dtype, shape) for every loadable tensor in ``path``."""
    names: dict[str, _Source] = {}
    for key, (dtype, shape) in header.tensors.items():
        name = strip_prefix(key)
        if is_ignored(name):  # recomputed, not loaded (RoPE tables, training counters, extra state)
            continue
        if adapter_only and not name.startswith("llm_adapter."):
            name = "llm_adapter." + name  # a separate adapter file holds the adapter's own names
        if name in names:
            raise ValueError(f"{path}: keys {names[name][1]!r} and {key!r} are the same tensor {name!r} under two "
                             "prefixes; keep one")
        names[name] = (path, key, dtype, shape)
    return names


def _config_for(path: Path, where: str, metadata: Mapping[str, str], shapes, dtypes) -> AnimaConfig:
    """The stored config if every tensor matches it; without one, the inferred config if every tensor matches it."""
    stored = stored_config(path, metadata)
    inferred, report = inspect_layout(shapes, dtypes, base=stored)
    if stored is None:
        if report or inferred is None:
            raise ValueError(f"{where} does not hold an Anima model: {report.message()}")
        return inferred
    try:
        stored.validate()
        invalid = None
    except ValueError as exc:
        invalid = str(exc)
    stored_report = check_layout(stored, shapes, dtypes) if invalid is None else None
    if invalid is None and not stored_report:
        return stored
    parts = []
    diffs = shape_field_differences(stored, inferred) if inferred is not None else []
    if diffs:
        parts.append("the tensor shapes disagree with the metadata config in "
                     + ", ".join(f"{f} (metadata {a}, tensors {b})" for f, a, b in diffs))
    if invalid is not None:
        parts.append(f"the metadata config is invalid: {invalid}")
        if report:
            parts.append(report.message())
    else:
        parts.append(stored_report.message())
    raise ValueError(f"{where} does not match the model config stored in its metadata ({CONFIG_METADATA_KEY}): "
                     + "; ".join(parts))


def load_anima(
    path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cfg: AnimaConfig | None = None,
) -> Anima:
    """Load an official Anima single file (DiT + adapter, or DiT with ``adapter_path`` holding the adapter).

    The config is ``cfg`` if given, else the one :func:`save_anima` stored in the metadata (which must agree with the
    tensors: a ValueError lists the disagreeing fields and tensors), else the one the tensor shapes imply
    (:func:`~anima_ft.model.config.inspect_layout`). Before any tensor is read, each file's header is validated
    (:func:`read_header`) and every tensor is checked against the config: all missing, unexpected, mis-shaped and
    non-float tensors are listed in one ``ValueError`` naming the file. The model is built on the meta device and
    filled tensor by tensor, so no random full-size init happens. ``dtype=None`` keeps the file's dtype.
    """
    path = Path(path)
    header = read_header(path)
    sources = _collect(path, header, adapter_only=False)
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        adapter_sources = _collect(adapter_path, read_header(adapter_path), adapter_only=True)
        clash = sorted(set(adapter_sources) & set(sources))
        if clash:
            raise ValueError(f"{path} already contains adapter tensors ({clash[:3]}...); drop adapter_path={adapter_path}")
        sources.update(adapter_sources)
    where = f"checkpoint {path}" + (f" + adapter {adapter_path}" if adapter_path else "")
    shapes = {n: shape for n, (_, _, _, shape) in sources.items()}
    dtypes = {n: dt for n, (_, _, dt, _) in sources.items()}
    if cfg is None:
        cfg = _config_for(path, where, header.metadata, shapes, dtypes)
    else:
        report = check_layout(cfg, shapes, dtypes)
        if report:
            raise ValueError(f"{where} does not match the given model config: {report.message()}")
    model = build_anima(cfg, device="meta")
    state: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(p for p, _, _, _ in sources.values()):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for n, (p, key, _, _) in sources.items():
                    if p == file:
                        t = f.get_tensor(key)
                        state[n] = t if dtype is None else t.to(dtype)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"could not read tensors from {file}: {exc}") from exc
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def official_state_dict(model: Anima, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``{"net." + name: tensor}`` for every parameter, contiguous, on CPU, cast to ``dtype``."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        out[OFFICIAL_PREFIX + name] = (t if dtype is None else t.to(dtype)).contiguous()
    return out


def save_state_dict_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Write safetensors to ``path.tmp`` then rename, so a crash never leaves a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_with(path, lambda name: save_file(dict(tensors), name, metadata=dict(metadata)))


def anima_metadata(cfg: AnimaConfig, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The safetensors metadata of an Anima file this project writes: the resolved config (read back by
    :func:`stored_config`), ``format``, and ``extra`` as strings."""
    meta = {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), "format": "pt"}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_anima(
    model: Anima, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, dtype=torch.bfloat16
) -> None:
    """Save in the official layout (``net.`` prefix, bf16 by default) with the resolved config in the metadata."""
    save_state_dict_atomic(official_state_dict(model, dtype), path, anima_metadata(model.cfg, metadata))
