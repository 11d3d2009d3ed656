"""The probe's inputs from command-line options, shared by ``anima-ft probe``, ``swap --attribute`` and
``distill attribute``: the option set (:func:`add_probe_args`), named eval sets from shards or image folders encoded
on the fly (:func:`eval_sets_from_args`), model dtypes and checkpoint steps."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from anima_ft.eval.eval_sets import IMAGE_SUFFIXES, encode_image_folder, load_shard_eval_set
from anima_ft.eval.probe import DEFAULT_NUM_NOISES, DEFAULT_SIGMAS

_STEP_RE = re.compile(r"(?:global_step|step)[_-]?(\d+)", re.IGNORECASE)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64, "file": None}


def step_from_name(path: str | Path) -> int | None:
    """The training step encoded in a checkpoint file name, or None."""
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def resolve_dtype(name: str) -> torch.dtype | None:
    """``bf16`` / ``fp32`` / ``fp64`` / ``file`` (keep the checkpoint's dtype) -> torch dtype or None."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_probe_args(ap: argparse.ArgumentParser) -> None:
    """The probe options shared by ``probe`` and ``swap --attribute``."""
    ap.add_argument("--eval-set", action="append", default=[], metavar="NAME=PATH",
                    help="named eval set from prepare shards (dir, glob or .tar); repeatable, e.g. replay=/data/replay")
    ap.add_argument("--sigmas", type=_float_list, default=list(DEFAULT_SIGMAS),
                    help="absolute sigmas in (0, 1], comma-separated (default 0.2,0.4,0.6,0.8)")
    ap.add_argument("--num-noises", type=int, default=DEFAULT_NUM_NOISES, help="fixed noises per (image, sigma)")
    ap.add_argument("--seed", type=int, default=0, help="probe noise seed (same seed = same noises everywhere)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N keys of each set (0 = all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", help="model dtype: bf16, fp32, fp64 or file (keep the file's)")
    ap.add_argument("--out-dir", default=None, help="where to write CSVs and PNGs")
    enc = ap.add_argument_group("encoders for image-folder eval sets (as in `anima-ft prepare`)")
    enc.add_argument("--vae", help="Qwen-Image VAE: official single .safetensors file or a diffusers directory")
    enc.add_argument("--qwen", help="Qwen3-0.6B-Base: single .safetensors file (+ --qwen-config) or an HF directory")
    enc.add_argument("--qwen-config", help="config.json for a single-file --qwen")
    enc.add_argument("--qwen-tokenizer", help="directory with the Qwen3 tokenizer")
    enc.add_argument("--t5-tokenizer", help="directory with the T5 tokenizer")
    enc.add_argument("--tiny-encoders", type=int, metavar="SEED", default=None,
                     help="TESTS ONLY: tiny random encoders instead of --vae/--qwen")
    enc.add_argument("--vae-dtype", default="fp32", help="VAE dtype (bf16, fp32)")
    enc.add_argument("--qwen-dtype", default="bf16", help="Qwen3 dtype (bf16, fp32)")
    enc.add_argument("--bucket-area", type=int, default=1024 * 1024, help="pixels per image for image folders")


def eval_sets_from_args(args: argparse.Namespace) -> dict:
    """Parse ``--eval-set NAME=PATH`` options into ``{name: [EvalSample]}``."""
    if not args.eval_set:
        raise ValueError("no --eval-set given: pass e.g. --eval-set replay=/data/replay_shards")
    sets, encoders = {}, None
    for spec in args.eval_set:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--eval-set {spec!r} must look like NAME=PATH, e.g. replay=/data/replay_shards")
        if name in sets:
            raise ValueError(f"--eval-set name {name!r} is given twice")
        if _is_image_folder(path):
            encoders = encoders or _build_encoders(args)
            sets[name] = _encode_folder(path, *encoders, args.bucket_area, args.limit or None)
        else:
            sets[name] = load_shard_eval_set(path, name=name, limit=args.limit or None)
    return sets


def _is_image_folder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and not any(p.glob("*.tar")) and any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir())


def _build_encoders(args: argparse.Namespace):
    """(vae, text_encoder) from the prepare-style flags; ``ValueError`` when they are missing."""
    from anima_ft.data.encoders import EncoderSpec, build_encoders

    if args.tiny_encoders is None and not (args.vae and args.qwen):
        raise ValueError("image-folder eval sets need --vae and --qwen (plus --qwen-tokenizer/--t5-tokenizer), or "
                         "encode the folder once with `anima-ft prepare` and pass the shards")
    if not (args.qwen_tokenizer and args.t5_tokenizer):
        raise ValueError("image-folder eval sets need --qwen-tokenizer and --t5-tokenizer")
    device = args.device if args.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return build_encoders(EncoderSpec.from_namespace(args), device)


def _encode_folder(path: str, vae, text, bucket_area: int, limit: int | None) -> list:
    """Encode an image folder like ``anima-ft prepare`` does (nearest bucket, resize + center crop)."""
    import numpy as np
    from PIL import Image

    from anima_ft.data.buckets import make_buckets, nearest_bucket, resize_and_crop

    buckets = make_buckets(bucket_area)

    def encode_image(p: Path) -> torch.Tensor:
        with Image.open(p) as im:
            im = im.convert("RGB")
            img, _ = resize_and_crop(im, nearest_bucket(*im.size, buckets))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        return vae.encode(pixels)[0].float().cpu()  # [16, h, w]

    def encode_caption(caption: str):
        enc = text.encode_unpadded([caption])[0]
        return enc.qwen_states.float(), enc.t5_ids

    return encode_image_folder(path, encode_image, encode_caption, limit)


