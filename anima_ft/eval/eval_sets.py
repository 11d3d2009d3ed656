"""Eval sets for the forgetting probe: small, fixed lists of pre-encoded samples.

An eval set is a plain ``list[EvalSample]``: the probe never depends on iteration order (noises are keyed by the
sample key, see :mod:`anima_ft.eval.probe`), so sets can come from webdataset shards written by ``anima-ft prepare``
(:func:`load_shard_eval_set`), from an image folder encoded on the fly (:func:`encode_image_folder`), or be built in
memory by tests.

Shape legend: C latent channels (16), h/w latent height/width, S Qwen tokens, Cq Qwen width (1024), L T5 tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class EvalSample:
    """One probe image with its caption encoding.

    ``qwen_states`` holds only the valid tokens (no padding; ``S`` may be 0 for an empty caption) and ``t5_ids`` the
    valid T5 ids including the trailing ``</s>`` (id 1). The masks are rebuilt from these lengths.
    """

    key: str
    latents: torch.Tensor  # [C, h, w] normalized VAE latents
    qwen_states: torch.Tensor  # [S, Cq]
    t5_ids: torch.Tensor  # [L] long
    caption: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("EvalSample.key must be a non-empty string: the probe noises are keyed by it")
        if self.latents.dim() != 3:
            raise ValueError(f"EvalSample {self.key!r}: latents must be [C, h, w], got shape {tuple(self.latents.shape)}")
        if self.qwen_states.dim() != 2:
            raise ValueError(
                f"EvalSample {self.key!r}: qwen_states must be [S, C], got shape {tuple(self.qwen_states.shape)}"
            )
        if self.t5_ids.dim() != 1 or self.t5_ids.numel() == 0:
            raise ValueError(
                f"EvalSample {self.key!r}: t5_ids must be a non-empty 1-D tensor (an empty caption is [1]), "
                f"got shape {tuple(self.t5_ids.shape)}"
            )


def check_eval_sets(eval_sets: dict[str, Sequence[EvalSample]]) -> None:
    """Raise ``ValueError`` for empty sets or duplicate keys inside one set (duplicates would share noises)."""
    if not eval_sets:
        raise ValueError("no eval sets given: pass at least one, e.g. --eval-set replay=/data/replay_shards")
    for name, samples in eval_sets.items():
        if len(samples) == 0:
            raise ValueError(f"eval set {name!r} is empty: check its path or drop it")
        seen: set[str] = set()
        for s in samples:
            if s.key in seen:
                raise ValueError(f"eval set {name!r} has the key {s.key!r} twice; sample keys must be unique")
            seen.add(s.key)


def collate_condition(sample: EvalSample, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Batch-of-one text condition in the batch contract layout (masks bool, True = valid).

    Returns ``qwen_states [1, max(S,1), Cq]`` (zero rows where masked), ``qwen_mask [1, max(S,1)]``,
    ``t5_ids [1, L]`` and ``t5_mask [1, L]``. An empty Qwen sequence becomes one zero, masked row (the empty-caption
    convention, docs/model.md#empty-caption).
    """
    s, c = sample.qwen_states.shape
    qwen = torch.zeros(1, max(s, 1), c, device=device, dtype=dtype)
    qmask = torch.zeros(1, max(s, 1), dtype=torch.bool, device=device)
    if s:
        qwen[0, :s] = sample.qwen_states.to(device=device, dtype=dtype)
        qmask[0, :s] = True
    t5 = sample.t5_ids.to(device=device, dtype=torch.long)[None]
    return {"qwen_states": qwen, "qwen_mask": qmask, "t5_ids": t5, "t5_mask": torch.ones_like(t5, dtype=torch.bool)}


def load_shard_eval_set(shards: str | Path | Sequence[str | Path], name: str = "eval",
                        limit: int | None = None, remote=None) -> list[EvalSample]:
    """Read an eval set from ``anima-ft prepare`` shards (a directory, a glob, or a list of ``.tar`` paths; any of
    them may be a URL such as ``s3://bucket/eval/``, read with the loader's retries; ``remote`` is the
    ``data.remote`` config, None = defaults).

    Every sample is decoded and checked once (``validate="full"``); broken samples are skipped with a warning by
    the shard reader. Samples are sorted by key so the set does not depend on shard order; ``limit`` keeps the first
    ``limit`` keys after sorting.
    """
    from anima_ft.data.sources import ShardReader, SourceSpec, build_catalog  # owner of the on-disk format

    spec = [str(shards)] if isinstance(shards, (str, Path)) else [str(p) for p in shards]
    catalog = build_catalog([SourceSpec(name, spec)], validate="full", remote=remote)
    reader = ShardReader(catalog, remote=remote)
    samples = []
    try:
        reader.schedule(list(range(len(catalog))))
        for i in range(len(catalog)):
            rec = reader.read(i)
            samples.append(EvalSample(key=str(catalog.keys[i]), latents=rec["latent"].float(),
                                      qwen_states=rec["qwen_states"].float(), t5_ids=rec["t5_ids"].long(),
                                      caption=str(rec["meta"].get("caption", ""))))
    finally:
        reader.close()
    samples.sort(key=lambda s: s.key)
    logger.info("eval set %r: %d samples from %s", name, len(samples), [str(p).split("?")[0] for p in spec])
    return samples[:limit] if limit else samples


def encode_image_folder(
    folder: str | Path,
    encode_image: Callable[[Path], torch.Tensor],
    encode_caption: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    limit: int | None = None,
) -> list[EvalSample]:
    """Build an eval set from ``folder/*.{png,jpg,...}`` with optional same-stem ``.txt`` captions.

    ``encode_image(path) -> latents [C, h, w]`` (normalized) and ``encode_caption(text) -> (qwen_states [S, Cq],
    t5_ids [L])`` are supplied by the caller (the VAE and the text encoder live outside this module). The key is the
    file stem, so renaming the folder keeps the noises.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a directory")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    samples = []
    for path in images[:limit] if limit else images:
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.exists() else ""
        qwen, t5 = encode_caption(caption)
        samples.append(EvalSample(key=path.stem, latents=encode_image(path), qwen_states=qwen, t5_ids=t5,
                                  caption=caption))
    logger.info("encoded %d images from %s", len(samples), folder)
    return samples
