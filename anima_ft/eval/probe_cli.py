"""``anima-ft probe CHECKPOINT... --eval-set NAME=PATH``: the forgetting probe on exported checkpoints.

Writes ``probe.csv`` (checkpoint, step, set, sigma, loss, rel_to_first), ``probe_samples.csv`` (per image) and
``probe_loss.png`` / ``probe_loss_rel.png`` (loss against step or checkpoint, one line per sigma, one panel per set)
into ``--out-dir``. Runs on one process, or sharded under ``torchrun`` (rank 0 writes the files).

Eval-set paths are shard directories/globs from ``anima-ft prepare``, or image folders (``*.png``/``*.jpg`` with
optional same-stem ``.txt`` captions) that are encoded on the fly with ``--vae`` and ``--qwen`` (same flags as
``anima-ft prepare``; each image is resized and center-cropped to its nearest bucket of ``--bucket-area``). The step of each checkpoint is read from its
file name (``..._step1200.safetensors``, ``step-1200``, ``global_step1200``) unless ``--steps`` gives them; without
steps the x axis is the checkpoint name.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from anima_ft.eval.eval_sets import IMAGE_SUFFIXES, encode_image_folder, load_shard_eval_set
from anima_ft.eval.probe import DEFAULT_NUM_NOISES, DEFAULT_SIGMAS, evaluate_sets

logger = logging.getLogger(__name__)

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
    from anima_ft.data.prepare_cli import build_encoders

    if args.tiny_encoders is None and not (args.vae and args.qwen):
        raise ValueError("image-folder eval sets need --vae and --qwen (plus --qwen-tokenizer/--t5-tokenizer), or "
                         "encode the folder once with `anima-ft prepare` and pass the shards")
    if not (args.qwen_tokenizer and args.t5_tokenizer):
        raise ValueError("image-folder eval sets need --qwen-tokenizer and --t5-tokenizer")
    device = args.device if args.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return build_encoders(args, device)


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


def _init_distributed(device: str) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return True
    return False


def write_outputs(out_dir: Path, labels: list[str], steps: list[int | None], results: list[dict], sigmas, keys):
    """Write probe.csv, probe_samples.csv and the two PNGs from per-checkpoint ``{set: [N, J]}`` tables."""
    from anima_ft.eval.plots import probe_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    means = {name: [res[name].mean(0).tolist() for res in results] for name in results[0]}
    with open(out_dir / "probe.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "step", "set", "sigma", "loss", "rel_to_first"])
        for c, (label, step) in enumerate(zip(labels, steps)):
            for name, rows in means.items():
                for j, sigma in enumerate(sigmas):
                    w.writerow([label, "" if step is None else step, name, sigma, repr(rows[c][j]),
                                repr(rows[c][j] / rows[0][j])])
    with open(out_dir / "probe_samples.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["checkpoint", "set", "key", "sigma", "loss"])
        for label, res in zip(labels, results):
            for name, table in res.items():
                for key, row in zip(keys[name], table.tolist()):
                    for sigma, v in zip(sigmas, row):
                        w.writerow([label, name, key, sigma, repr(v)])
    numeric = all(s is not None for s in steps)
    x = [str(s) for s in steps] if numeric else labels
    x_title = "training step" if numeric else "checkpoint"
    probe_plot(x, means, sigmas, out_dir / "probe_loss.png", x_title)
    probe_plot(x, means, sigmas, out_dir / "probe_loss_rel.png", x_title, relative=True)


def main(argv: list[str]) -> int:
    """Entry point of ``anima-ft probe``."""
    ap = argparse.ArgumentParser(prog="anima-ft probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="exported .safetensors checkpoints, in training order")
    ap.add_argument("--adapter", default=None, help="separate adapter file for checkpoints that hold only the DiT")
    ap.add_argument("--steps", default=None, help="comma-separated step per checkpoint (default: from file names)")
    add_probe_args(ap)
    args = ap.parse_args(argv)
    if args.out_dir is None:
        ap.error("--out-dir is required")
    from anima_ft.model import load_anima

    distributed = _init_distributed(args.device)
    rank = dist.get_rank() if distributed else 0
    try:
        eval_sets = eval_sets_from_args(args)
        steps = ([int(s) for s in args.steps.split(",")] if args.steps
                 else [step_from_name(p) for p in args.checkpoints])
        if len(steps) != len(args.checkpoints):
            ap.error(f"--steps has {len(steps)} values for {len(args.checkpoints)} checkpoints")
        results = []
        for path in args.checkpoints:
            model = load_anima(path, adapter_path=args.adapter, device=args.device, dtype=resolve_dtype(args.dtype))
            results.append(evaluate_sets(model, eval_sets, args.sigmas, args.num_noises, args.seed,
                                         progress=f"probe {Path(path).name}"))
            logger.info("probed %s: %s", path, {k: v.mean(0).tolist() for k, v in results[-1].items()})
            del model
        if rank == 0:
            labels = [Path(p).stem for p in args.checkpoints]
            keys = {name: [s.key for s in samples] for name, samples in eval_sets.items()}
            write_outputs(Path(args.out_dir), labels, steps, results, args.sigmas, keys)
            print((Path(args.out_dir) / "probe.csv").read_text())
            print(f"wrote {args.out_dir}/probe.csv, probe_samples.csv, probe_loss.png, probe_loss_rel.png")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0
