"""Synthetic shards for the loader tests: tiny random samples written with the real ShardWriter.

Every tensor is a deterministic function of the sample's key, so a test can recompute the expected contents of
any batch (``expected_sample``) without reading the tar.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from anima_ft.data.shard_format import EncodedSample, ShardWriter, make_fingerprint

QWEN_DIM = 8
FINGERPRINT = make_fingerprint({"vae": "fake", "seed": 0}, {"text": "fake", "seed": 0})


def expected_sample(key: str, bucket: tuple[int, int]) -> dict:
    """The tensors ``write_source`` stores for ``key`` (a pure function of the key and bucket)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    S = int(torch.randint(1, 7, (1,), generator=g))
    L = int(torch.randint(1, 6, (1,), generator=g))
    W, H = bucket
    return {
        "latent": torch.randn(16, H // 8, W // 8, generator=g).to(torch.bfloat16),
        "qwen_states": torch.randn(S, QWEN_DIM, generator=g).to(torch.bfloat16),
        "t5_ids": torch.randint(2, 32000, (L,), generator=g, dtype=torch.int32),
        "caption": f"caption of {key}",
    }


def write_source(out_dir: Path, name: str, buckets: list[tuple[int, int]], num_shards: int, per_shard: int,
                 fingerprint: dict = FINGERPRINT) -> dict[str, tuple[int, int]]:
    """Write ``num_shards`` shards of ``per_shard`` samples cycling through ``buckets``; returns key -> bucket."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = {}
    for shard in range(num_shards):
        with ShardWriter(out_dir / f"{name}-{shard:04d}.tar", fingerprint) as writer:
            for i in range(per_shard):
                key = f"{name}_{shard:04d}_{i:04d}"
                bucket = buckets[(shard * per_shard + i) % len(buckets)]
                ref = expected_sample(key, bucket)
                meta = {"caption": ref["caption"], "source": name, "bucket": list(bucket)}
                writer.add(EncodedSample(key, ref["latent"], ref["qwen_states"], ref["t5_ids"], meta))
                keys[key] = bucket
            writer.commit()
    return keys
