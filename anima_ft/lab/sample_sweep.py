"""Sample-only sweeps on a finished lab run: classifier accuracy of a checkpoint's samples per sampler setting.

``python -m anima_ft.lab.sample_sweep --lab runs/lab --steps 8,16,32 --cfg 1,3,5 --shift 1,3`` scores every
combination of Euler steps x CFG scale x schedule shift on the same prompts and noises as the report's grids
(:func:`anima_ft.lab.pipeline.make_grids`), and prints a markdown table (setting -> accuracy per prompt group).
Nothing is retrained; the measurements of ``docs/lab.md`` ("What limits the base model's samples") came from it.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def sweep(checkpoint: Path, data_dir: Path, seed: int, target: tuple[int, ...], per_class: int,
          steps: list[int], scales: list[float], shifts: list[float]) -> list[dict]:
    """One row ``{"steps", "cfg", "shift", "target", "replay", "n_target", "n_replay"}`` per setting."""
    from anima_ft.lab.pipeline import SampleScorer
    from anima_ft.model import load_anima

    scorer = SampleScorer(data_dir, seed, target)
    model = load_anima(str(checkpoint), dtype=torch.float32)
    rows = []
    for n, g, s in itertools.product(steps, scales, shifts):
        acc = scorer.score(scorer.sample(model, per_class, n, g, s))
        rows.append({"steps": n, "cfg": g, "shift": s, **acc})
    return rows


def markdown(rows: list[dict]) -> str:
    """The sweep as a markdown table, one row per setting."""
    lines = ["| Euler steps | CFG | shift | target-class prompts | replay-class prompts |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['cfg']:g} | {r['shift']:g} | {100 * r['target']:.1f}% (n={r['n_target']}) "
                     f"| {100 * r['replay']:.1f}% (n={r['n_replay']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the sweep, print the table (and write ``--json`` if given)."""
    ap = argparse.ArgumentParser(prog="python -m anima_ft.lab.sample_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", type=Path, default=Path("runs/lab"), help="a finished lab directory")
    ap.add_argument("--checkpoint", default="base", help="export name in the lab directory (base, no_replay, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-classes", default="0,1,2")
    ap.add_argument("--per-class", type=int, default=10, help="samples per digit")
    ap.add_argument("--steps", default="16", help="comma-separated Euler step counts")
    ap.add_argument("--cfg", default="3", help="comma-separated CFG scales")
    ap.add_argument("--shift", default="1", help="comma-separated schedule shifts")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = sweep(args.lab / f"{args.checkpoint}.safetensors", args.lab / "data", args.seed,
                 tuple(int(c) for c in args.target_classes.split(",")), args.per_class,
                 [int(x) for x in args.steps.split(",")], [float(x) for x in args.cfg.split(",")],
                 [float(x) for x in args.shift.split(",")])
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
