"""Fixtures for the config tests: tiny shard directories (Qwen width 32 = the tiny adapter's, and 8) and tiny
checkpoints (16 and 17 latent channels, not-safetensors files) for the model-vs-data preflight checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_helpers import write_shards


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    """Shards that fit ``model.size=tiny``."""
    return write_shards(tmp_path_factory.mktemp("cfg_shards") / "target")


@pytest.fixture(scope="session")
def wide_qwen_shard_dir(tmp_path_factory) -> Path:
    """Shards whose Qwen states are 8 wide (the tiny adapter reads 32)."""
    return write_shards(tmp_path_factory.mktemp("cfg_shards_q8") / "target", qwen_dim=8)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``{"tiny16": tiny Anima file, "tiny17": the same with 17 latent channels, "text": not safetensors,
    "truncated": a safetensors header cut short}``."""
    from anima_ft.model import AnimaConfig, build_anima
    from anima_ft.model.state_dict import save_anima

    root = tmp_path_factory.mktemp("cfg_ckpt")
    out = {}
    for name, channels in (("tiny16", 16), ("tiny17", 17)):
        cfg = AnimaConfig.tiny(num_blocks=1)
        cfg.in_channels = cfg.out_channels = channels
        save_anima(build_anima(cfg), root / f"{name}.safetensors")
        out[name] = root / f"{name}.safetensors"
    out["text"] = root / "notes.safetensors"
    out["text"].write_text("these are notes, not tensors\n")
    out["truncated"] = root / "cut.safetensors"
    out["truncated"].write_bytes(out["tiny16"].read_bytes()[:100])
    return out
