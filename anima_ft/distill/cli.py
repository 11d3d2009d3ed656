"""``anima-ft distill``: precompute teacher velocities, or measure how far knowledge moved into the DiT.

    anima-ft distill precompute --teacher anima.safetensors --shards /data/replay --out /data/replay_teacher \\
        --sigmas 0.2,0.4,0.6,0.8 [--rank R --world-size W]
    anima-ft distill attribute --teacher anima.safetensors --student run/export.safetensors \\
        --eval-set replay=/data/replay_eval --reinit-seed 1234 [--out-dir DIR]

``precompute`` reads ``anima-ft prepare`` shards, runs the frozen teacher once per sample at K fixed (sigma, noise)
draws and writes the velocity store that ``distill.teacher=precomputed`` trains from. Run one process per GPU with
``--rank``/``--world-size``: sample i (in key order) goes to rank i mod W; each rank writes its own index.
``attribute`` prints the pairing table of :mod:`anima_ft.distill.attribution`. The mini-lab's redistribution variant
is part of ``anima-ft lab``: it trains through ``launch/train.py`` like the lab's other runs
(:mod:`anima_ft.lab.redistribution`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from anima_ft.command_errors import reports_input_errors
from anima_ft.eval.eval_sets import EvalSample, collate_condition

from .precompute import write_teacher_velocities
from .teacher import Teacher, load_teacher

logger = logging.getLogger(__name__)


def sample_batches(samples: Sequence[EvalSample], rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """One batch-contract micro-batch (B = 1) per sample of this rank's share (i mod world_size == rank)."""
    for i in range(rank, len(samples), world_size):
        s = samples[i]
        cond = collate_condition(s, "cpu", torch.float32)
        yield {"latents": s.latents[None].float(), **cond, "source": ["distill"],
               "source_id": torch.zeros(1, dtype=torch.long), "caption": [s.caption], "key": [s.key]}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype {name!r} is not valid; choose one of {sorted(table)}")
    return table[name]


def _precompute(args: argparse.Namespace) -> int:
    from anima_ft.eval.eval_sets import load_shard_eval_set

    if not 0 <= args.rank < args.world_size:
        raise ValueError(f"--rank {args.rank} must be in [0, --world-size {args.world_size})")
    samples = load_shard_eval_set(args.shards, name="distill", limit=args.limit or None)
    module = load_teacher(args.teacher, args.adapter, device=args.device, dtype=_dtype(args.dtype))
    index = write_teacher_velocities(Teacher(module), sample_batches(samples, args.rank, args.world_size), args.out,
                                     args.sigmas, seed=args.seed, samples_per_shard=args.samples_per_shard,
                                     dtype=_dtype(args.store_dtype), rank=args.rank)
    print(f"wrote {index}")
    return 0


def _attribute(args: argparse.Namespace) -> int:
    from anima_ft.eval.probe_inputs import eval_sets_from_args, resolve_dtype

    from .attribution import redistribution, redistribution_table

    dtype = resolve_dtype(args.dtype)
    teacher = load_teacher(args.teacher, device=args.device, dtype=dtype)
    student = load_teacher(args.student, device=args.device, dtype=dtype)
    if student.llm_adapter is None or teacher.llm_adapter is None:
        raise ValueError("attribute needs an adapter in both --teacher and --student checkpoints")
    tables = []
    for name, samples in eval_sets_from_args(args).items():
        result = redistribution(teacher, student, samples, args.sigmas, args.reinit_seed, args.num_noises, args.seed)
        tables.append(f"### {name}\n\n{redistribution_table(result)}\n")
    text = "\n".join(tables)
    print(text)
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "redistribution.md").write_text(text)
    return 0


@reports_input_errors("anima-ft distill")
def main(argv: list[str]) -> int:
    """Entry point of ``anima-ft distill`` (see the module docstring)."""
    from anima_ft.eval.probe_inputs import add_probe_args

    if argv[:1] == ["lab"]:
        raise ValueError("`anima-ft distill lab` is gone: the redistribution variant now trains through "
                         "launch/train.py as part of `anima-ft lab` (rerun only it with `anima-ft lab --out LAB_DIR "
                         "--reuse-runs [--distill-recipe RECIPE]`)")
    ap = argparse.ArgumentParser(prog="anima-ft distill", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("precompute", help="write teacher velocities at fixed (sigma, noise) per sample")
    pre.add_argument("--teacher", required=True, help="official Anima safetensors (the init checkpoint)")
    pre.add_argument("--adapter", default=None, help="separate LLM-adapter safetensors, if not in --teacher")
    pre.add_argument("--shards", required=True, help="prepare shards of the distill source(s): dir, glob or .tar")
    pre.add_argument("--out", required=True, help="output directory (index-r*.json + velocities-*.safetensors)")
    pre.add_argument("--sigmas", type=_floats, default=[0.2, 0.4, 0.6, 0.8], help="the K fixed sigmas in (0, 1]")
    pre.add_argument("--seed", type=int, default=0, help="noise seed (noise = f(seed, key, k))")
    pre.add_argument("--samples-per-shard", type=int, default=256)
    pre.add_argument("--limit", type=int, default=0, help="first N keys only (0 = all)")
    pre.add_argument("--rank", type=int, default=0)
    pre.add_argument("--world-size", type=int, default=1)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pre.add_argument("--dtype", default="bf16", help="teacher compute dtype: bf16, fp32, fp64")
    pre.add_argument("--store-dtype", default="bf16", help="stored velocity dtype: bf16 (512 KiB/draw at 1024 px) "
                                                           "or fp32")
    att = sub.add_parser("attribute", help="teacher gaps of DiT / re-initialized adapter pairings")
    att.add_argument("--teacher", required=True, help="the starting checkpoint")
    att.add_argument("--student", required=True, help="the distilled checkpoint (export)")
    att.add_argument("--reinit-seed", type=int, default=1234, help="seed of the shared re-initialized adapter")
    add_probe_args(att)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _precompute(args) if args.command == "precompute" else _attribute(args)
