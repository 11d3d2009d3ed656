"""Fixtures for the config tests: one tiny shard directory (Qwen width 32 = the tiny adapter's) and tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def write_shards(out_dir: Path, qwen_dim: int = 32, n: int = 2) -> Path:
    """One shard of ``n`` random samples in the real format; returns the directory."""
    from anima_ft.data import EncodedSample, ShardWriter, make_fingerprint

    g = torch.Generator().manual_seed(qwen_dim)
    out_dir.mkdir(parents=True)
    with ShardWriter(out_dir / "part-0000.tar", make_fingerprint({"vae": "t"}, {"text": "t"})) as writer:
        for i in range(n):
            latent = torch.randn(16, 8, 8, generator=g).to(torch.bfloat16)
            qwen = torch.randn(3, qwen_dim, generator=g).to(torch.bfloat16)
            t5 = torch.randint(2, 32000, (2,), generator=g, dtype=torch.int32)
            writer.add(EncodedSample(f"s_{i:04d}", latent, qwen, t5, {"caption": f"c {i}", "bucket": [64, 64]}))
        writer.commit()
    return out_dir


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
