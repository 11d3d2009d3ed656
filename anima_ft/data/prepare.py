"""``prepare``: images + captions -> pre-encoded shards (``shard_format.py``), resumable and split across ranks.

Inputs are folders of images with sidecar ``.txt`` captions, or webdataset tars as img2dataset writes them (``jpg``/
``png``/``webp`` with ``txt`` or ``json`` holding ``caption``/``text``). Work is cut into units (a folder's sorted
images in chunks of ``shard_size``; one unit per input tar); unit u is done by rank ``u % world_size`` and becomes
``out_dir/UNIT.tar`` (+ index). A unit whose index already exists with the same fingerprint is skipped (resume).
``out_dir`` may be a URL (``s3://bucket/shards``): each shard is then written to a local staging directory and
uploaded, the index last (``shard_upload.py``), and resume looks for the index in the store.

Nothing about one bad input stops the run: every dropped input is counted under a named reason (first examples kept)
in its shard's index, and ``prepare_summary.json`` aggregates every finished shard's counts in ``out_dir``:

* ``missing_image``, ``undecodable_image``, ``unreadable_input`` (a file or tar member that cannot be read);
* ``decompression_bomb`` (PIL's limit, ``PIL.Image.MAX_IMAGE_PIXELS``), ``image_too_large`` (more than
  ``max_input_pixels``, read from the header before anything is decoded);
* ``aspect_ratio_out_of_range``: covering the nearest bucket would crop away more than ``max_crop_fraction`` of the
  image (decided before resizing, so the resize target is at most bucket area / (1 - max_crop_fraction) pixels:
  memory per image is bounded by the bucket and ``max_input_pixels``, never by the input's aspect ratio);
* ``missing_caption``, ``empty_caption``, ``caption_invalid_utf8``, ``caption_nul_byte``, ``caption_bad_json``;
* ``encode_error`` (an encoder call that raised; the whole batch is counted).

Captions truncated at 512 tokens are kept and counted (``caption_truncated``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from anima_ft.data.buckets import make_buckets, nearest_bucket, resize_and_crop
from anima_ft.data.object_store import is_url
from anima_ft.data.shard_format import (
    EncodedSample,
    ShardWriter,
    fingerprint_hash,
    index_path_for,
    make_fingerprint,
)
from anima_ft.data.shard_upload import RemoteOutput
from anima_ft.runtime import write_json_atomic

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_EXAMPLES = 20  # skipped inputs named per reason in the summary


class LatentEncoder(Protocol):
    """What prepare needs from the VAE (``anima_ft.model.vae.AnimaVAE`` satisfies it)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalized latents [B, 16, H/8, W/8]."""
        ...

    def fingerprint(self) -> Any:
        """JSON-able identity of the weights and settings."""
        ...


class CaptionEncoder(Protocol):
    """What prepare needs from the text side (``anima_ft.model.text_encoder.TextEncoder`` satisfies it)."""

    def encode_unpadded(self, captions: list[str]) -> list:
        """Per caption an object with ``qwen_states`` [S, C], ``t5_ids`` [L] and ``truncated`` (bool)."""
        ...

    def fingerprint(self) -> Any:
        """JSON-able identity of the weights, tokenizers and settings."""
        ...


@dataclass
class PrepareConfig:
    """Settings of one prepare run (the CLI flags map 1:1)."""

    out_dir: str
    bucket_area: int = 1024 * 1024  # target pixels per image; sides are multiples of 16
    bucket_width_step: int = 64  # spacing of bucket widths (a multiple of 16)
    min_ar: float = 0.5  # narrowest bucket W/H
    max_ar: float = 2.0  # widest bucket W/H
    shard_size: int = 256  # images per folder unit (= at most this many samples per shard)
    batch_size: int = 8  # images per encoder call (same bucket)
    source_name: str = "target"  # stored in every sample's metadata
    max_crop_fraction: float = 0.5  # skip inputs whose bucket crop would cut away more than this share of the image
    max_input_pixels: int = 1 << 26  # skip inputs with more pixels (67 MP, ~200 MB as RGB); <= PIL's bomb limit
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    staging_dir: str = ""  # with a URL out_dir: where shards are written before upload ("" = a new temp directory)


@dataclass
class WorkUnit:
    """One output shard's worth of input: a chunk of a folder, or one input tar."""

    name: str
    images: list[tuple[Path, Path]] = field(default_factory=list)  # (image, caption .txt) for folders
    tar: Path | None = None


@dataclass
class RawItem:
    """An input before decoding: where it came from, its image bytes (or None) and caption (None = missing).

    ``caption_problem`` names why the caption bytes were refused (``caption_invalid_utf8``, ...); None = usable.
    """

    origin: str
    image: bytes | None
    caption: str | None
    caption_problem: str | None = None


def decode_caption(raw: bytes | None, kind: str = "txt") -> tuple[str | None, str | None]:
    """Caption bytes of a ``.txt`` file or a ``json`` record -> ``(caption, problem)``; exactly one is None,
    except ``(None, None)`` for a missing caption. Strict UTF-8 (a leading BOM is dropped); NUL bytes are refused."""
    if raw is None:
        return None, None
    try:
        text = bytes(raw).decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None, "caption_invalid_utf8"
    if kind == "json":
        try:
            meta = json.loads(text)
        except ValueError:
            return None, "caption_bad_json"
        text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        if not isinstance(text, str):
            return None, None
    if "\x00" in text:
        return None, "caption_nul_byte"
    return text, None


def crop_fraction(width: int, height: int, bucket: tuple[int, int]) -> float:
    """Share of the image that covering ``bucket`` (scale to cover, center crop) cuts away: 1 - min(r, 1/r) with
    r = (W/H) / (width/height). The resize target has about bucket area / (1 - crop_fraction) pixels."""
    r = (bucket[0] / bucket[1]) / (width / height)
    return 1.0 - min(r, 1.0 / r)


def check_prepare_config(cfg: PrepareConfig) -> None:
    """Raise ValueError naming the setting for a rank outside the world or limits that bound nothing."""
    if not 0 <= cfg.rank < cfg.world_size:
        raise ValueError(f"rank {cfg.rank} must be in [0, world_size={cfg.world_size})")
    if not (math.isfinite(cfg.max_crop_fraction) and 0.0 <= cfg.max_crop_fraction < 1.0):
        raise ValueError(f"max_crop_fraction={cfg.max_crop_fraction} must be in [0, 1) (0.5 = skip inputs that lose "
                         "more than half of the image to the bucket crop)")
    bomb = Image.MAX_IMAGE_PIXELS
    if not 1 <= cfg.max_input_pixels <= (bomb or cfg.max_input_pixels):
        raise ValueError(f"max_input_pixels={cfg.max_input_pixels} must be in [1, {bomb}] (PIL's decompression-bomb "
                         "limit, PIL.Image.MAX_IMAGE_PIXELS)")
    for name in ("shard_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:60]


def list_units(inputs: list[str], shard_size: int) -> list[WorkUnit]:
    """Cut the inputs into work units in a deterministic order (see the module docstring)."""
    units: list[WorkUnit] = []
    for spec in inputs:
        path = Path(spec)
        tars = [path] if path.suffix == ".tar" else sorted(path.glob("*.tar")) if path.is_dir() else []
        images = sorted(p for p in path.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS) if path.is_dir() else []
        if not path.exists():
            raise ValueError(f"input {spec} does not exist; pass image folders or img2dataset .tar files")
        if not tars and not images:
            raise ValueError(f"input {spec} holds no images ({'/'.join(IMAGE_EXTS)}) and no .tar files")
        units += [WorkUnit(_safe(f"{path.parent.name}_{t.stem}" if path.suffix == ".tar" else t.stem), tar=t)
                  for t in tars]
        for i in range(0, len(images), shard_size):
            chunk = images[i : i + shard_size]
            units.append(WorkUnit(_safe(f"{path.name}-{i // shard_size:06d}"), [(p, p.with_suffix(".txt")) for p in chunk]))
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError(f"inputs give clashing shard names {sorted({n for n in names if names.count(n) > 1})}; "
                         "rename the input folders/tars")
    return units


def _caption_from(sample: dict) -> tuple[str | None, str | None]:
    if "txt" in sample:
        return decode_caption(sample["txt"], "txt")
    if "json" in sample:
        return decode_caption(sample["json"], "json")
    return None, None


def iter_unit(unit: WorkUnit, counts: Counter) -> Iterator[RawItem]:
    """Raw inputs of a unit; tar-level read errors are counted as ``unreadable_input`` and skipped."""
    for image_path, caption_path in unit.images:
        try:
            caption, problem = decode_caption(caption_path.read_bytes() if caption_path.exists() else None)
            image = image_path.read_bytes()
        except OSError as err:
            counts["unreadable_input"] += 1
            log.warning("cannot read %s: %s", image_path, err)
            continue
        yield RawItem(str(image_path), image, caption, problem)
    if unit.tar is not None:
        def handler(err: Exception) -> bool:
            counts["unreadable_input"] += 1
            log.warning("unreadable member in %s: %s", unit.tar, err)
            return True

        for sample in wds.tariterators.tarfile_samples([{"url": str(unit.tar)}], handler=handler):
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            yield RawItem(f"{unit.tar}:{sample.get('__key__')}", image, *_caption_from(sample))


class _Encoder:
    """Batches decoded images per bucket, runs both encoders, and writes the results into one shard."""

    def __init__(self, writer: ShardWriter, vae: LatentEncoder, text: CaptionEncoder, cfg: PrepareConfig, unit: str):
        self.writer, self.vae, self.text, self.cfg, self.unit = writer, vae, text, cfg, unit
        self.pending: dict[tuple[int, int], list[tuple[RawItem, Image.Image, dict]]] = {}
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.written = 0

    def skip(self, reason: str, origin: str, detail: str = "") -> None:
        """Count one dropped input."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(origin)
        log.warning("skipping %s (%s) %s", origin, reason, detail)

    def add(self, item: RawItem, buckets: list[tuple[int, int]]) -> None:
        """Decode, bucket and queue one input; encode when its bucket has a full batch."""
        if item.image is None:
            return self.skip("missing_image", item.origin)
        if item.caption_problem is not None:
            return self.skip(item.caption_problem, item.origin)
        if item.caption is None:
            return self.skip("missing_caption", item.origin)
        if not item.caption.strip():
            return self.skip("empty_caption", item.origin)
        image = self.decode(item)
        if image is None:
            return
        bucket = nearest_bucket(*image.size, buckets)
        lost = crop_fraction(*image.size, bucket)
        if lost > self.cfg.max_crop_fraction:  # decided before resizing: the covering resize would be lost / (1-lost)
            return self.skip("aspect_ratio_out_of_range", item.origin, f"{image.size[0]}x{image.size[1]} in bucket "
                             f"{bucket[0]}x{bucket[1]} would lose {lost:.0%} (max_crop_fraction "
                             f"{self.cfg.max_crop_fraction:g})")
        cropped, geometry = resize_and_crop(image, bucket)
        queue = self.pending.setdefault(bucket, [])
        queue.append((item, cropped, {**geometry, "bucket": list(bucket)}))
        if len(queue) >= self.cfg.batch_size:
            self.flush(bucket)

    def decode(self, item: RawItem) -> Image.Image | None:
        """The RGB image (EXIF orientation applied), or None after counting why it was skipped.

        The pixel count is read from the header before decoding; PIL's decompression-bomb warning is an error here.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(item.image)) as im:
                    w, h = im.size  # header only: nothing is decoded yet
                    if w * h > self.cfg.max_input_pixels:
                        self.skip("image_too_large", item.origin, f"{w}x{h} > max_input_pixels "
                                  f"{self.cfg.max_input_pixels}")
                        return None
                    return ImageOps.exif_transpose(im).convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            self.skip("decompression_bomb", item.origin, str(err))
        except Exception as err:  # PIL raises many types on corrupt files
            self.skip("undecodable_image", item.origin, f"{type(err).__name__}: {err}")
        return None

    def flush(self, bucket: tuple[int, int]) -> None:
        """Encode and write every queued input of ``bucket``."""
        batch = self.pending.pop(bucket, [])
        if not batch:
            return
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for _, im, _ in batch])
        captions = [item.caption.strip() for item, _, _ in batch]
        try:
            latents = self.vae.encode(pixels / 127.5 - 1.0).float().cpu()  # [B, 16, H/8, W/8]
            texts = self.text.encode_unpadded(captions)
        except Exception as err:  # one failing batch must not end a multi-day run
            for item, _, _ in batch:
                self.skip("encode_error", item.origin, f"{type(err).__name__}: {err}")
            return
        for (item, _, geometry), latent, text, caption in zip(batch, latents, texts, captions):
            if text.truncated:
                self.counts["caption_truncated"] += 1
            meta = {"caption": caption, "source": self.cfg.source_name, "origin": item.origin,
                    "caption_truncated": bool(text.truncated), **geometry}
            key = f"{self.unit}_{self.written:06d}"
            self.writer.add(EncodedSample(key, latent, text.qwen_states.cpu(), text.t5_ids.cpu(), meta))
            self.written += 1


def prepare_shards(inputs: list[str], vae: LatentEncoder, text_encoder: CaptionEncoder, cfg: PrepareConfig) -> dict:
    """Encode this rank's units of ``inputs`` into ``cfg.out_dir`` (a directory or a URL); returns the summary over
    all finished shards."""
    check_prepare_config(cfg)
    remote = RemoteOutput(cfg.out_dir, cfg.staging_dir) if is_url(cfg.out_dir) else None
    out_dir = remote.staging if remote else Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buckets = make_buckets(cfg.bucket_area, 16, cfg.bucket_width_step, cfg.min_ar, cfg.max_ar)
    fingerprint = make_fingerprint(vae.fingerprint(), text_encoder.fingerprint())
    fp_hash = fingerprint_hash(fingerprint)
    units = list_units(inputs, cfg.shard_size)[cfg.rank :: cfg.world_size]
    bar = tqdm(units, desc=f"prepare rank {cfg.rank}", disable=not cfg.progress, unit="shard")
    try:
        for unit in bar:
            tar_path = out_dir / f"{unit.name}.tar"
            if remote:
                done = remote.finished_index(unit.name)
            else:
                done = json.loads(index_path_for(tar_path).read_text()) if index_path_for(tar_path).exists() else None
            if done is not None:
                if done.get("fingerprint_hash") != fp_hash:
                    where = remote.url_for(tar_path.name) if remote else tar_path
                    raise ValueError(f"{where} exists with encoder fingerprint "
                                     f"{done.get('fingerprint_hash', '?')[:12]}, this run's is {fp_hash[:12]}; write "
                                     "to a new --out or delete the old shards")
                continue  # finished earlier: resume skips it
            with ShardWriter(tar_path, fingerprint) as writer:
                enc = _Encoder(writer, vae, text_encoder, cfg, unit.name)
                for item in iter_unit(unit, enc.counts):
                    enc.add(item, buckets)
                for bucket in list(enc.pending):
                    enc.flush(bucket)
                writer.commit(skipped={**enc.counts, "examples": enc.examples})
            if remote:
                remote.publish(tar_path)
            bar.set_postfix(samples=enc.written)
        if remote:
            summary = summarize(remote.indices())
            remote.put_json("prepare_summary.json", summary)
            return summary
        return write_summary(out_dir)
    finally:
        if remote:
            remote.close()


def summarize(indices: list[dict]) -> dict:
    """Aggregate finished shard indices into the ``prepare_summary.json`` content."""
    summary = {"shards": 0, "samples": 0, "counts": Counter(), "buckets": Counter(), "examples": {}}
    for index in indices:
        summary["shards"] += 1
        summary["samples"] += index["num_samples"]
        summary["buckets"].update(index["buckets"])
        skipped = dict(index.get("skipped", {}))
        for reason, examples in skipped.pop("examples", {}).items():
            summary["examples"].setdefault(reason, []).extend(examples[: MAX_EXAMPLES - len(summary["examples"].get(reason, []))])
        summary["counts"].update(skipped)
    return {**summary, "counts": dict(summary["counts"]), "buckets": dict(summary["buckets"])}


def write_summary(out_dir: str | Path) -> dict:
    """Aggregate every finished shard index in ``out_dir`` into ``prepare_summary.json`` (and return it)."""
    out_dir = Path(out_dir)
    summary = summarize([json.loads(p.read_text()) for p in sorted(out_dir.glob("*.index.json"))])
    write_json_atomic(out_dir / "prepare_summary.json", summary)
    return summary
