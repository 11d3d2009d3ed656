"""Shards for the loader tests: tiny random samples written with the real ShardWriter (``write_source``), and real
``prepare`` shards of skimage images through stand-in encoders (``write_prepared_source``, the fuzz tests' input).

In ``write_source`` every tensor is a deterministic function of the sample's key, so a test can recompute the
expected contents of any batch (``expected_sample``) without reading the tar.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
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


class PoolVAE:
    """A stand-in VAE for ``prepare``: latent = 8x8 average pool of the pixels, channels tiled 3 -> 16."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels.double(), 8)  # [B, 3, H/8, W/8]
        return pooled.repeat(1, 6, 1, 1)[:, :16].float()

    def fingerprint(self):
        return "pool-vae-1"


@dataclass
class _Text:
    qwen_states: torch.Tensor
    t5_ids: torch.Tensor
    truncated: bool


class CharText:
    """A stand-in text encoder: Qwen state row i = sin of (char code i, column); T5 ids = char codes + 2, ``</s>``."""

    def encode_unpadded(self, captions):
        out = []
        for caption in captions:
            codes = torch.tensor([ord(ch) % 500 for ch in caption[:24]], dtype=torch.float32)
            qwen = torch.sin(codes[:, None] * torch.arange(1, QWEN_DIM + 1) / 7)
            out.append(_Text(qwen, torch.cat([codes.long() + 2, torch.ones(1).long()]), len(caption) > 24))
        return out

    def fingerprint(self):
        return {"char_text": 1}


PREPARED_IMAGES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "coins", "moon", "brick", "grass"]  # crops under 50%


def write_prepared_source(images_dir: Path, out_dir: Path, shard_size: int = 4) -> dict:
    """Real ``anima-ft prepare`` shards of ten skimage images (plus one undecodable input) through the stand-in
    encoders, all in the single 32x32 bucket; returns the prepare summary."""
    import skimage.data
    from PIL import Image

    from anima_ft.data.prepare import PrepareConfig, prepare_shards

    images_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(PREPARED_IMAGES):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(images_dir / f"{name}.png")
        (images_dir / f"{name}.txt").write_text(f"photo {i} of {name}" + ", with a long tail" * (i % 3))
    (images_dir / "zz_broken.png").write_bytes(b"\x89PNG not an image")
    (images_dir / "zz_broken.txt").write_text("broken")
    cfg = PrepareConfig(out_dir=str(out_dir), bucket_area=32 * 32, bucket_width_step=16, min_ar=1.0, max_ar=1.0,
                        shard_size=shard_size, batch_size=3, source_name="fuzz", progress=False)
    return prepare_shards([str(images_dir)], PoolVAE(), CharText(), cfg)
