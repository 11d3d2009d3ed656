"""``anima-ft prepare``: encode images + captions into pre-encoded shards (see ``prepare.py``, ``shard_format.py``).

Examples::

    anima-ft prepare data/my_images --out shards/target --vae qwen_image_vae.safetensors \\
        --qwen qwen_3_06b_base.safetensors --qwen-tokenizer configs/qwen3_06b --t5-tokenizer configs/t5_old
    torchrun --nproc-per-node 8 -m anima_ft.data.prepare_cli laion/{00000..00099}.tar --out shards/replay ...

Several processes (torchrun / srun: RANK, WORLD_SIZE, LOCAL_RANK) split the work units; each uses GPU LOCAL_RANK
when CUDA is present, else the CPU. Re-running the same command resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from anima_ft.command_errors import reports_input_errors
from anima_ft.data.encoders import ENCODER_DTYPES, EncoderSpec, build_encoders
from anima_ft.data.prepare import PrepareConfig, prepare_shards

log = logging.getLogger(__name__)
DTYPES = ENCODER_DTYPES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests can read the defaults)."""
    p = argparse.ArgumentParser(prog="anima-ft prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image folders (sidecar .txt captions) and/or img2dataset .tar files")
    p.add_argument("--out", required=True, help="output directory for NAME.tar + NAME.index.json shards, or a URL "
                   "(s3://bucket/prefix, gs://...): shards are then written locally and uploaded, the index last; "
                   "credentials and endpoint from the storage library's environment (AWS_*, AWS_ENDPOINT_URL)")
    p.add_argument("--staging-dir", default="", help="with a URL --out: local directory for shards before upload "
                   "(default: a new temporary directory, removed at the end)")
    p.add_argument("--vae", help="Qwen-Image VAE: official single .safetensors file or a diffusers directory")
    p.add_argument("--qwen", help="Qwen3-0.6B-Base: single .safetensors file (+ --qwen-config) or an HF directory")
    p.add_argument("--qwen-config", help="config.json for a single-file --qwen (default: beside it / tokenizer dir)")
    p.add_argument("--qwen-tokenizer", required=True, help="directory with the Qwen3 tokenizer (vocab.json, ...)")
    p.add_argument("--t5-tokenizer", required=True, help="directory with the T5 tokenizer (tokenizer.json)")
    p.add_argument("--tiny-encoders", type=int, metavar="SEED", default=None,
                   help="FOR DEMOS AND TESTS ONLY: use tiny random encoders built from SEED instead of --vae/--qwen; "
                        "the shards are useless for real training")
    p.add_argument("--bucket-area", type=int, default=1024 * 1024, help="target pixels per image (default 1 MP)")
    p.add_argument("--bucket-width-step", type=int, default=64, help="spacing of bucket widths, multiple of 16")
    p.add_argument("--min-ar", type=float, default=0.5, help="narrowest bucket aspect ratio W/H")
    p.add_argument("--max-ar", type=float, default=2.0, help="widest bucket aspect ratio W/H")
    p.add_argument("--max-crop-fraction", type=float, default=0.5,
                   help="skip (count) inputs whose bucket crop would cut away more than this share of the image")
    p.add_argument("--max-input-pixels", type=int, default=1 << 26,
                   help="skip (count) inputs with more pixels, read from the header before decoding (default 67 MP)")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard for folder inputs (tars: 1:1)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    p.add_argument("--source-name", default="target", help="source label stored in each sample's metadata")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--vae-dtype", choices=DTYPES, default="fp32", help="VAE weight dtype (part of the fingerprint)")
    p.add_argument("--qwen-dtype", choices=DTYPES, default="bf16", help="Qwen3 weight dtype (part of the fingerprint)")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this process (default $RANK)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="number of processes splitting the work (default $WORLD_SIZE)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


@reports_input_errors("anima-ft prepare")
def main(argv: list[str]) -> int:
    """Entry point of ``anima-ft prepare``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = args.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    vae, text = build_encoders(EncoderSpec.from_namespace(args), device)
    cfg = PrepareConfig(out_dir=args.out, bucket_area=args.bucket_area, bucket_width_step=args.bucket_width_step,
                        min_ar=args.min_ar, max_ar=args.max_ar, max_crop_fraction=args.max_crop_fraction,
                        max_input_pixels=args.max_input_pixels, shard_size=args.shard_size,
                        batch_size=args.batch_size, source_name=args.source_name, rank=args.rank,
                        world_size=args.world_size, progress=not args.no_progress, staging_dir=args.staging_dir)
    summary = prepare_shards(args.inputs, vae, text, cfg)
    log.info("prepare rank %d done: %d samples in %d shards so far, counts %s (summary: %s/prepare_summary.json)",
             args.rank, summary["samples"], summary["shards"], summary["counts"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
