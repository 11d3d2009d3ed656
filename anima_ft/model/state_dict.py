"""Official checkpoint format <-> our module: build, load and save Anima single-file safetensors (docs/model.md#keys).

The official file holds the DiT under ``net.`` and the adapter under ``net.llm_adapter.`` in bf16. We also accept the
native ComfyUI prefix ``model.diffusion_model.`` and no prefix, an adapter in a separate file, and we drop derived
buffers (``pos_embedder.*`` RoPE tables, NVIDIA's ``accum_*`` counters, ``*._extra_state``), which are recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anima_ft.runtime import atomic_save_with

from .config import AnimaConfig, infer_config
from .dit import Anima

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "net."
_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")
_IGNORED = re.compile(r"(^|\.)pos_embedder\.|(^|\.)accum_|_extra_state$")
CONFIG_METADATA_KEY = "anima_ft.config"


def strip_prefix(name: str) -> str:
    """Internal name of an official key: drop ``net.`` / ``model.diffusion_model.`` if present."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_derived_buffer(name: str) -> bool:
    """True for tensors that are recomputed rather than loaded (RoPE tables, training counters, TE extra state)."""
    return bool(_IGNORED.search(name))


def build_anima(
    cfg: AnimaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = 0
) -> Anima:
    """Construct Anima directly on ``device`` (``meta`` allocates nothing), with a seeded random init."""
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = Anima(cfg)
    return model.to(dtype) if str(device) != "meta" else model


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` read from the header only; a clear error for a missing or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt safetensors header ({exc})") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def _collect(path: Path, adapter_only: bool) -> dict[str, str]:
    """Map internal name -> file key for every loadable tensor in ``path``."""
    names: dict[str, str] = {}
    for key in read_safetensors_header(path):
        name = strip_prefix(key)
        if is_derived_buffer(name):
            continue
        if adapter_only and not name.startswith("llm_adapter."):
            name = "llm_adapter." + name  # a separate adapter file holds the adapter's own names
        names[name] = key
    return names


def _check_keys(expected: Mapping[str, torch.Size], found: Mapping[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or mis:
        def fmt(xs, f=str):
            return ", ".join(f(x) for x in xs[:20]) + (f" ... (+{len(xs) - 20} more)" if len(xs) > 20 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {fmt(unexpected)}")
        if mis:
            parts.append(f"{len(mis)} mis-shaped: " + fmt(mis, lambda k: f"{k} file {list(found[k])} vs model {list(expected[k])}"))
        raise ValueError(f"{where} does not match the Anima model: " + "; ".join(parts))


def load_anima(
    path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cfg: AnimaConfig | None = None,
) -> Anima:
    """Load an official Anima single file (DiT + adapter, or DiT with ``adapter_path`` holding the adapter).

    The config is inferred from the tensor shapes unless given. The model is built on the meta device and filled
    tensor by tensor, so no random full-size init happens. ``dtype=None`` keeps the file's dtype.
    Any missing, unexpected or mis-shaped tensor raises ``ValueError`` listing them.
    """
    path = Path(path)
    names = _collect(path, adapter_only=False)
    sources = {n: (path, k) for n, k in names.items()}
    if adapter_path is not None:
        adapter_names = _collect(Path(adapter_path), adapter_only=True)
        clash = sorted(set(adapter_names) & set(names))
        if clash:
            raise ValueError(f"{path} already contains adapter tensors ({clash[:3]}...); drop adapter_path={adapter_path}")
        sources.update({n: (Path(adapter_path), k) for n, k in adapter_names.items()})
    headers = {p: read_safetensors_header(p) for p, _ in sources.values()}
    shapes = {n: tuple(headers[p][k][1]) for n, (p, k) in sources.items()}
    cfg = cfg or infer_config(shapes)
    model = build_anima(cfg, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(expected, shapes, f"checkpoint {path}" + (f" + adapter {adapter_path}" if adapter_path else ""))
    state: dict[str, torch.Tensor] = {}
    handles = {}
    try:
        for n, (p, k) in sources.items():
            if p not in handles:
                handles[p] = safe_open(str(p), framework="pt", device="cpu")
            t = handles[p].get_tensor(k)
            state[n] = t if dtype is None else t.to(dtype)
    except SafetensorError as exc:
        raise ValueError(f"could not read tensors from {path}: {exc}") from exc
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


def save_anima(
    model: Anima, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, dtype=torch.bfloat16
) -> None:
    """Save in the official layout (``net.`` prefix, bf16 by default) with the resolved config in the metadata."""
    meta = {CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict()), "format": "pt"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_state_dict_atomic(official_state_dict(model, dtype), path, meta)
