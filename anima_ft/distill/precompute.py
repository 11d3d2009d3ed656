"""Precomputed teacher velocities: run the teacher once, offline, at fixed (t, noise) per sample; train from disk.

For every sample key and draw ``k`` in ``0..K-1`` the writer fixes

    t_k   = sigmas[k]                                    (the same K sigmas for every sample)
    eps_k = N(0, I) from a CPU generator seeded by blake2b(seed, key, k)   (regenerated when read, never stored)
    v_k   = v_teacher((1 - t_k) x_0 + t_k eps_k, t_k, caption)

and stores ``v`` [K, 16, h, w] (bf16 by default) as tensor ``key`` in ``velocities-r{rank}-{n:05d}.safetensors``,
with ``index-r{rank}.json`` mapping keys to files (plus sigmas, seed, dtype). Disk per sample = K * 16 * h * w * 2
bytes in bf16 (at 1024 px, h = w = 128: 512 KiB per draw). The objective draws ``k`` per sample and step, so the
student sees K fixed (t, noise) pairs per sample instead of fresh ones: the price of not running the teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .teacher import Teacher

logger = logging.getLogger(__name__)
INDEX_GLOB = "index-r*.json"


def draw_seed(key: str, k: int, seed: int) -> int:
    """Stable 63-bit generator seed of draw ``k`` of sample ``key`` (blake2b, independent of order and world size)."""
    msg = f"anima_ft.distill\x00{seed}\x00{key}\x00{k}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & (2**63 - 1)


def draw_noise(key: str, k: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The fixed standard-normal noise (float32, CPU) of draw ``k`` of sample ``key``."""
    gen = torch.Generator().manual_seed(draw_seed(key, k, seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _shard_path(out_dir: Path, rank: int, n: int) -> Path:
    return out_dir / f"velocities-r{rank}-{n:05d}.safetensors"


@torch.no_grad()
def write_teacher_velocities(teacher: Teacher, batches: Iterable[dict], out_dir: str | Path, sigmas: Sequence[float],
                             seed: int = 0, samples_per_shard: int = 256, dtype: torch.dtype = torch.bfloat16,
                             rank: int = 0) -> Path:
    """Write the teacher's velocities for every sample of ``batches`` (batch-contract dicts); returns the index path.

    Each sample runs one teacher forward of batch K (its K draws). Run one process per rank over disjoint data
    with a replicated teacher (no collectives); every rank writes its own index, the reader merges them.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas {sigmas} must be a non-empty list of values in (0, 1]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    K = len(sigmas)
    index: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    n_shards = 0

    def flush() -> None:
        nonlocal n_shards, pending
        if pending:
            path = _shard_path(out_dir, rank, n_shards)
            tmp = path.with_suffix(".tmp")
            save_file(pending, str(tmp), metadata={"format": "pt"})
            tmp.rename(path)
            index.update({key: path.name for key in pending})
            n_shards, pending = n_shards + 1, {}

    t_K = torch.tensor(sigmas, dtype=torch.float32)
    for batch in batches:
        for b, key in enumerate(batch["key"]):
            if key in index or key in pending:
                raise ValueError(f"sample key {key!r} occurs twice; precomputed velocities are keyed by sample key")
            x_0 = batch["latents"][b].float()[None, :, None]  # [1, 16, 1, h, w]
            shape = batch["latents"].shape[1:]  # [16, h, w]
            eps = torch.stack([draw_noise(key, k, shape, seed) for k in range(K)])[:, :, None]  # [K, 16, 1, h, w]
            x_t = (1 - t_K.view(K, 1, 1, 1, 1)) * x_0 + t_K.view(K, 1, 1, 1, 1) * eps
            cond = [batch[n][b:b + 1].expand(K, *batch[n].shape[1:]) for n in
                    ("qwen_states", "qwen_mask", "t5_ids", "t5_mask")]
            v = teacher(x_t, t_K, *cond).velocity  # [K, 16, 1, h, w]
            pending[key] = v[:, :, 0].to(dtype).cpu().contiguous()
            if len(pending) >= samples_per_shard:
                flush()
    flush()
    meta = {"sigmas": sigmas, "seed": seed, "dtype": str(dtype).removeprefix("torch."), "keys": index}
    path = out_dir / f"index-r{rank}.json"
    path.write_text(json.dumps(meta))
    logger.info("wrote teacher velocities of %d samples x %d draws to %s", len(index), K, out_dir)
    return path


class VelocityStore:
    """Reader of a precomputed-velocity directory: ``get(key, k) -> (t, noise, v)``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        paths = sorted(self.dir.glob(INDEX_GLOB))
        if not paths:
            raise ValueError(f"{self.dir}: no {INDEX_GLOB} found; write it with `anima-ft distill precompute`")
        self.keys: dict[str, str] = {}
        self.sigmas: list[float] | None = None
        for p in paths:
            meta = json.loads(p.read_text())
            if self.sigmas is None:
                self.sigmas, self.seed = meta["sigmas"], meta["seed"]
            elif meta["sigmas"] != self.sigmas or meta["seed"] != self.seed:
                raise ValueError(f"{p}: sigmas/seed differ from the other index files of {self.dir}; "
                                 "precompute every rank with the same --sigmas and --seed")
            self.keys.update(meta["keys"])
        self._open: dict[str, object] = {}

    @property
    def num_draws(self) -> int:
        """K, the number of fixed (t, noise) draws per sample."""
        return len(self.sigmas)

    def velocity(self, key: str) -> torch.Tensor:
        """All K stored velocities of ``key``: [K, 16, h, w] in the stored dtype."""
        name = self.keys.get(key)
        if name is None:
            raise ValueError(f"sample key {key!r} has no precomputed teacher velocity in {self.dir}; precompute "
                             "every distill source's shards (or list that source as kind=flow)")
        if name not in self._open:
            self._open[name] = safe_open(str(self.dir / name), framework="pt")
        return self._open[name].get_tensor(key)

    def get(self, key: str, k: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(t_k, eps_k [16, h, w] float32, v_k [16, h, w] float32)`` of draw ``k`` of sample ``key``."""
        v = self.velocity(key)[k].float()
        return self.sigmas[k], draw_noise(key, k, v.shape, self.seed), v
