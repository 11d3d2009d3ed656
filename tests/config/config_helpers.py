"""Helpers of the config tests (a module with a unique name: several test folders have a conftest.py)."""

from __future__ import annotations

from pathlib import Path

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
