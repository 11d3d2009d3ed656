"""A few optimizer steps of the FULL-size Anima through the trainer on one GPU: does the 8-GPU recipe's setup run?

``configs/anima_full_h100x8.yaml`` with only what one GPU and a benchmark need changed: random init of the
full-size model (``model.init_path: ""``, ``model.size: full``: no official file travels to the GPU machine), micro
batch 1 without accumulation (global batch 1), ``--steps`` constant-LR steps, no checkpoints (a 2B ZeRO
checkpoint is ~25 GB), wandb off. ZeRO-2, bf16 and activation checkpointing of every block stay as the recipe sets
them. The data are synthetic 1024^2 pre-encoded shards written here with the project's own shard writer
(``anima_ft.data.ShardWriter``): a target and a replay source (weights 0.8 / 0.2 as in the recipe), random bf16
latents [16, 128, 128], random Qwen states [S, 1024] and T5 ids of varying caption lengths.

Reports, from the run's metrics.jsonl and log: per-step loss, step seconds (1 / samples_per_s at micro batch 1),
peak GPU memory (``torch.cuda.max_memory_allocated`` in the trainer: weights, grads, fp32 master, Adam and
activations), grad norm, seconds from launch to the engine being ready, and the exit code.

    python launch/bench/full_size_step.py --work /tmp/full --out /tmp/full.json
    python launch/bench/full_size_step.py --smoke --work /tmp/full --out /tmp/full.json    # tiny model, CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import ds_launch  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from anima_ft.data import EncodedSample, ShardWriter, make_fingerprint  # noqa: E402
from anima_ft.runtime import write_json_atomic  # noqa: E402

RECIPE = REPO / "configs" / "anima_full_h100x8.yaml"
FINGERPRINT = make_fingerprint("synthetic-gpu-session-vae", "synthetic-gpu-session-text")


def write_shards(root: Path, name: str, num_samples: int, latent: int, qwen_dim: int, seed: int) -> str:
    """One shard of ``num_samples`` random samples under ``root/name``; returns its glob."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with ShardWriter(out / f"{name}-00000.tar", FINGERPRINT) as writer:
        for i in range(num_samples):
            n_qwen = int(torch.randint(32, 300, (1,), generator=g))
            n_t5 = int(torch.randint(16, 200, (1,), generator=g))
            t5 = torch.cat([torch.randint(2, 32000, (n_t5 - 1,), generator=g), torch.ones(1, dtype=torch.long)])
            meta = {"caption": f"synthetic {name} {i}", "source": name, "bucket": [latent * 8, latent * 8]}
            writer.add(EncodedSample(f"{name}_{i:06d}", torch.randn(16, latent, latent, generator=g),
                                     torch.randn(n_qwen, qwen_dim, generator=g), t5, meta))
        writer.commit()
    return str(out / "*.tar")


def session_config(work: Path, steps: int, smoke: bool) -> Path:
    """The recipe with the one-GPU benchmark changes (module docstring), written to ``work/full_size.yaml``."""
    cfg = yaml.safe_load(RECIPE.read_text())
    latent, qwen_dim = (16, 32) if smoke else (128, 1024)  # the tiny model's adapter reads 32-wide states
    samples = steps + 4
    cfg["run"]["dir"] = str(work / "run")
    cfg["model"].update(init_path="", size="tiny" if smoke else "full")
    cfg["data"].update(num_workers=0 if smoke else 2, sources=[
        {"name": "target", "shards": [write_shards(work / "shards", "target", samples, latent, qwen_dim, 1)],
         "weight": 0.8},
        {"name": "replay", "shards": [write_shards(work / "shards", "replay", samples, latent, qwen_dim, 2)],
         "weight": 0.2}])
    cfg["batch"] = {"micro_batch_size": 1, "grad_accum_steps": 1, "global_batch_size": 1}
    cfg["stages"] = [{"name": "main", "num_steps": steps, "warmup_steps": 0, "decay": "constant"}]
    cfg["checkpoint"] = {"every_steps": 0, "every_minutes": 0, "keep_last": 1, "save_at_end": False}
    cfg["logging"] = {"every_steps": 1, "wandb_mode": "disabled", "progress_bar": False}
    if smoke:
        cfg["dist"].update(precision="fp32", backend="gloo")
    path = work / "full_size.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="shards, config, run dir and log go here (emptied first)")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("STEP_DEADLINE", 0)),
                    help="unix time by which the run must have ended (default: $STEP_DEADLINE, 0 = none)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo, fp32)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    config = session_config(work, args.steps, args.smoke)
    res: dict = {"smoke": args.smoke, "recipe": str(RECIPE.relative_to(REPO)), "config": yaml.safe_load(config.read_text()),
                 "shards_s": time.time() - t0}
    write_json_atomic(args.out, res)
    log = work / "train.log"
    t0 = time.time()
    proc = ds_launch.start(["--config", str(config)], log, cpu=args.smoke)
    res["exit_code"] = ds_launch.wait({"run": proc}, args.deadline or time.time() + 900)["run"]
    res["wall_s"] = time.time() - t0
    first, ready = ds_launch.log_times(log, "trainable elements")
    if first is not None and ready is not None:
        res["launch_to_engine_s"] = ready - first
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (work / "run" / "metrics.jsonl").is_file() else []
    res["steps"] = [{k: r.get(k) for k in ("step", "loss", "samples_per_s", "peak_mem_gb", "grad_norm", "mfu")}
                    for r in rows]
    for r in res["steps"]:
        r["step_s"] = 1.0 / r["samples_per_s"] if r.get("samples_per_s") else None
    later = [r["step_s"] for r in res["steps"][1:] if r["step_s"]]  # the first step carries warm-up costs
    if later:
        res["median_step_s"] = statistics.median(later)
        res["img_per_s"] = 1.0 / res["median_step_s"]
    if rows:
        res["peak_mem_gb"] = max(r.get("peak_mem_gb") or 0.0 for r in rows)
        res["first_step_s"] = res["steps"][0]["step_s"]
    res["done"] = True
    write_json_atomic(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "config"}), flush=True)
    return 0 if res["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
