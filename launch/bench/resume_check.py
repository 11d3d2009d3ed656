"""The trainer on one GPU: kill-and-resume loss agreement ("the resume tolerance on GPU") and a ZeRO-3 run.

Every run is ``deepspeed --num_gpus 1 launch/train.py --config configs/tiny_cpu.yaml`` (the tiny model on the
synthetic dataset, ``run.deterministic: true``) with nccl + bf16 on a GPU, gloo + fp32 on CPU (``--smoke``):

* A: ``--steps`` steps uninterrupted, a checkpoint every ``--every`` steps (ZeRO-2);
* B: the same, killed by ``ANIMA_FT_FAULT=kill:K:0`` (SIGKILL during 0-based step K, after the checkpoint of step
  ``K // every * every``), then started again on the same run directory: it resumes from that checkpoint;
* Z3: as A with ZeRO-3 (``--no-zero3`` skips it).

A, B's first part and Z3 run side by side (separate processes on the one GPU; their speed is not measured), then
B's resumed part. From the metrics.jsonl files: the per-step losses and the max abs / relative differences
``resumed - A`` (the resume tolerance), ``B before the kill - A`` (run-to-run noise of identical runs) and
``Z3 - A``. Results go to ``--out`` (JSON), logs to ``--work/*.log``.

    python launch/bench/resume_check.py --work /tmp/resume --out /tmp/resume.json
    python launch/bench/resume_check.py --smoke --work /tmp/resume --out /tmp/resume.json     # CPU ranks, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import ds_launch  # noqa: E402

from anima_ft.runtime import write_json_atomic  # noqa: E402

TINY = REPO / "configs" / "tiny_cpu.yaml"


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def start(run_dir: Path, log: Path, overrides: list[str], smoke: bool, fault: str = ""):
    """One tiny-recipe run in ``run_dir`` (see ``ds_launch.start``)."""
    return ds_launch.start(["--config", str(TINY), f"run.dir={run_dir}", *overrides], log, cpu=smoke, fault=fault)


def losses(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """``(first, last)``: per-step loss from the first and the last row of each step in a metrics.jsonl.

    A resumed run appends to the same file, so the steps it recomputes appear twice: the first row is from before
    the kill, the last from after the resume.
    """
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    if not path.is_file():
        return first, last
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row:
                first.setdefault(int(row["step"]), float(row["loss"]))
                last[int(row["step"])] = float(row["loss"])
    return first, last


def compare(got: dict[int, float], ref: dict[int, float], steps: list[int]) -> dict:
    """Max abs and max relative difference of ``got`` against ``ref`` over ``steps`` present in both."""
    common = [s for s in steps if s in got and s in ref]
    if not common:
        return {"steps": [], "note": "no common steps"}
    diffs = [abs(got[s] - ref[s]) for s in common]
    rels = [abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in common]
    return {"steps": common, "max_abs": max(diffs), "max_rel": max(rels), "bitwise_equal": max(diffs) == 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="run directories and logs go here (emptied first)")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    ap.add_argument("--kill-at", type=int, default=9, help="0-based step during which run B is killed")
    ap.add_argument("--no-zero3", action="store_true")
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("STEP_DEADLINE", 0)),
                    help="unix time by which every run must have ended (default: $STEP_DEADLINE, 0 = none)")
    ap.add_argument("--smoke", action="store_true", help="CPU ranks (gloo, fp32): exercise the script here")
    args = ap.parse_args(argv)
    deadline = args.deadline or time.time() + 600
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gpu = _gpu() and not args.smoke
    common = [f"num_steps={args.steps}", f"checkpoint.every_steps={args.every}", "checkpoint.keep_last=0",
              "logging.progress_bar=false", "logging.every_steps=1"]
    common += ["dist.backend=nccl", "dist.precision=bf16"] if gpu else ["dist.backend=gloo", "dist.precision=fp32"]
    res: dict = {"smoke": args.smoke, "gpu": gpu, "config": str(TINY.relative_to(REPO)), "overrides": common,
                 "steps": args.steps, "every": args.every, "kill_at_step_index": args.kill_at}
    write_json_atomic(args.out, res)

    # round 1: A, B (killed) and Z3 side by side
    t0 = time.time()
    procs = {"A": start(work / "A", work / "A.log", common, args.smoke),
             "B_killed": start(work / "B", work / "B.log", common, args.smoke, fault=f"kill:{args.kill_at}:0")}
    run_z3 = not args.no_zero3
    if run_z3:
        procs["Z3"] = start(work / "Z3", work / "Z3.log", [*common, "dist.zero_stage=3"], args.smoke)
    res["exit_codes"] = ds_launch.wait(procs, time.time() + 0.6 * (deadline - time.time()))  # leave time for B's resume
    res["round1_s"] = time.time() - t0
    latest = work / "B" / "checkpoints" / "latest"
    res["B_checkpoint_at_kill"] = latest.read_text().strip() if latest.is_file() else None
    write_json_atomic(args.out, res)

    # round 2: B resumes from its last checkpoint
    t0 = time.time()
    res["exit_codes"].update(ds_launch.wait({"B_resumed": start(work / "B", work / "B.log", common, args.smoke)}, deadline))
    res["round2_s"] = time.time() - t0

    _, a = losses(work / "A" / "metrics.jsonl")
    b_first, b_last = losses(work / "B" / "metrics.jsonl")
    _, z3 = losses(work / "Z3" / "metrics.jsonl")
    resumed_from = int(res["B_checkpoint_at_kill"].split("_")[-1]) if res["B_checkpoint_at_kill"] else None
    all_steps = list(range(1, args.steps + 1))
    res["loss"] = {"A": a, "B_before_kill": b_first, "B_final": b_last, "Z3": z3}
    if resumed_from is not None:
        resumed = [s for s in all_steps if s > resumed_from]
        res["resumed_from_step"] = resumed_from
        res["resume_vs_uninterrupted"] = compare(b_last, a, resumed)
    before = [s for s in all_steps if s <= args.kill_at]  # rows written before the kill (step k+1 never finished)
    res["identical_runs_before_kill"] = compare(b_first, a, before)
    if run_z3:
        res["zero3_vs_zero2"] = compare(z3, a, all_steps)
    res["done"] = True
    write_json_atomic(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "loss"}), flush=True)
    unfinished = [k for k, rc in res["exit_codes"].items() if rc != 0 and k != "B_killed"]
    return 1 if unfinished or res["exit_codes"].get("B_killed") == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
