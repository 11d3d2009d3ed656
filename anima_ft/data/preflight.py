"""Pre-flight checks of a training config against the files it names, before any rank works.

Checks that need the model and data packages, run before any rank works (launch/train.py, right after validate):

* ``model.init_path`` / ``model.adapter_path`` hold a readable safetensors header of an Anima model;
* every ``data.sources.*.shards`` pattern and ``eval.sets.*.path`` finds .tar shards (``discover_shards``: a
  listing of the bucket for URLs such as ``s3://bucket/shards/``, never a local glob);
* the model fits the data: its latent channels (``in_channels``) equal the shards' latent channels and its adapter's
  source width equals the shards' Qwen width (``qwen_dim`` of the first shard's index), or the synthetic data's.

Only headers and indexes are read (milliseconds, also for a 4 GB checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anima_ft.config.schema import Config
from anima_ft.data.object_store import ObjectStore, is_url, redact
from anima_ft.data.shard_format import LATENT_CHANNELS, read_index
from anima_ft.data.sources import SourceSpec, discover_shards, open_remote_shard
from anima_ft.model.config import AnimaConfig, infer_config
from anima_ft.model.groups import is_ignored
from anima_ft.model.state_dict import read_safetensors_header, strip_prefix

SYNTHETIC_LATENT_CHANNELS = 16  # anima_ft.train.batches.SyntheticStream makes 16-channel latents, like the VAE


@dataclass
class ModelShapes:
    """What the data must match: latent channels of the patch embedder, Qwen width of the adapter (None = no adapter)."""

    in_channels: int
    qwen_dim: int | None
    where: str


def _header(key: str, path: str) -> dict[str, tuple[str, list[int]]]:
    try:  # existence was checked by validate (config/inputs.py); a missing file still lands in the except
        return read_safetensors_header(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key}={path!r} is not a readable safetensors file ({exc}); give the official Anima "
                         ".safetensors file") from None


def model_shapes(cfg: Config) -> ModelShapes:
    """The model's latent channels and adapter source width, from the init file header or the ``model.size`` preset."""
    m = cfg.model
    if not m.init_path:
        preset = AnimaConfig.tiny() if m.size == "tiny" else AnimaConfig()
        return ModelShapes(preset.in_channels, preset.adapter.source_dim if preset.adapter else None,
                           f"model.size={m.size}")
    shapes = {strip_prefix(k): v[1] for k, v in _header("model.init_path", m.init_path).items()}
    if m.adapter_path:
        for k, v in _header("model.adapter_path", m.adapter_path).items():
            name = strip_prefix(k)
            shapes[name if name.startswith("llm_adapter.") else "llm_adapter." + name] = v[1]
    shapes = {k: v for k, v in shapes.items() if not is_ignored(k)}
    try:
        acfg = infer_config(shapes)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"model.init_path={m.init_path!r} does not hold an Anima model ({exc}); give the official "
                         "Anima safetensors file") from None
    return ModelShapes(acfg.in_channels, acfg.adapter.source_dim if acfg.adapter else None,
                       f"model.init_path={m.init_path!r}")


def _shards(key: str, name: str, patterns: list[str], store: ObjectStore) -> list[Path | str]:
    found: list[Path | str] = []
    for j, pattern in enumerate(patterns):
        try:
            found += discover_shards(SourceSpec(name, [str(pattern)]), store)
        except ValueError:
            raise ValueError(f"{key}.{j}={redact(pattern)!r} matches no .tar shards; give a directory, glob or .tar "
                             "path (or a URL of one) written by `anima-ft prepare`") from None
    return found


def check_inputs(cfg: Config) -> None:
    """Raise ValueError naming the key for an unreadable model file, a pattern without shards, or a model that does
    not fit the data."""
    model = model_shapes(cfg)
    store = ObjectStore(cfg.data.remote)
    first: tuple[str, Path | str] | None = None
    for i, s in enumerate(cfg.data.sources):
        shards = _shards(f"data.sources.{i}.shards", s.name, list(s.shards), store)
        first = first or (f"data.sources.{i}.shards", shards[0])
    for i, s in enumerate(cfg.eval.sets):
        _shards(f"eval.sets.{i}.path", s.name, [s.path], store)
    if first is None:  # the synthetic stream takes its Qwen width from the model
        data_channels, data_qwen, data_where = SYNTHETIC_LATENT_CHANNELS, None, "the synthetic data"
    else:
        key, shard = first
        try:
            index = open_remote_shard(str(shard), store)[0] if is_url(shard) else read_index(shard)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
        # the shard format (version checked by read_index) fixes LATENT_CHANNELS-channel latents; the reader enforces it
        data_channels, data_qwen, data_where = LATENT_CHANNELS, index.get("qwen_dim"), f"shard {redact(shard)} ({key})"
    if model.in_channels != data_channels:
        raise ValueError(f"{model.where}: the model takes {model.in_channels} latent channels but {data_where} has "
                         f"{data_channels}; use a checkpoint made for {data_channels}-channel latents or re-encode the "
                         "data with the matching VAE")
    if data_qwen is not None and model.qwen_dim is not None and model.qwen_dim != data_qwen:
        raise ValueError(f"{model.where}: the LLM adapter reads {model.qwen_dim}-wide Qwen states but {data_where} "
                         f"holds {data_qwen}-wide ones; encode the data with the text encoder the model was made for")
