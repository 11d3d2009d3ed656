"""The full-size production path on CPU ranks: a random 2B Anima through prepare-format shards, ZeRO-2, ZeRO-3, a
staged run, kill -9 + resume, a 1-rank universal resume, and export. ``bash launch/bench/full_size_cpu.sh OUT_DIR``.

What runs (each training run is ``deepspeed --num_gpus N launch/train.py --config OUT/configs/<run>.yaml``, a recipe
derived from ``configs/anima_full_h100x8.yaml``: bf16, activation checkpointing of every block, ZeRO from the
recipe; only what this machine needs changed, written into each config file):

1. ``model``: a random full-size Anima (``AnimaConfig()``: 685 tensors, 2,091,068,928 parameters) in the official
   single-file layout, bf16, written tensor by tensor (``anima_ft.model.streamed_file``).
2. ``shards``: target and replay shards at 256 px (latents [16, 32, 32]) with full-width Qwen states [S, 1024] and
   T5 ids (S and the T5 length drawn per sample like real captions, 32-300 and 16-200 tokens), written by the
   project's ``ShardWriter``.
3. Trainable set: the ``mod`` (adaLN modulation, 177.7 M) and ``llm_adapter`` (134.7 M) groups; every other group at
   LR 0 (frozen: no gradients, no optimizer state). Why: the fp32 master weights and Adam moments of all 2.09 B
   parameters (16 B each = 33 GB) do not fit a 24 GB machine, while this set still runs every code path
   (backward through all 28 blocks for ``mod``, through the cross-attention for the adapter, partitions of a
   312 M-element flat buffer, frozen tensors in the checkpoint and the export). LR 1e-4 (not the recipe's 1e-5) so
   that a few steps move the trained weights by more than a bf16 rounding step.
4. Runs: ``zero2`` (uninterrupted, ``--steps`` steps, a checkpoint every ``--every``); ``zero2_killed`` (the same,
   ``kill -9`` of every process as soon as the first checkpoint is complete, then started again: ``resume=auto``);
   its per-step losses must equal ``zero2``'s bitwise; ``universal_1rank`` (one rank resumes the 2-rank final
   checkpoint of ``zero2_killed`` for 2 more steps: DeepSpeed universal conversion); ``zero3`` (``--steps`` steps,
   ZeRO-3); ``staged`` (stage 1 trains ``mod`` with the adapter frozen, stage 2 unfreezes ``llm_adapter``).
5. ``export``: ``anima-ft export`` of ``zero2``'s last checkpoint; ``load_anima`` reads it back; names and shapes
   equal the input's, every frozen tensor is bitwise equal, the trained groups changed.

Before anything, the memory and disk the plan needs (``anima_ft.train.memory_plan``) are compared with what the
machine has: too little of either ends the script with one line and exit code 2. Results go to OUT/results.json
after every phase (a crash keeps what was measured) and OUT/results.md (the table of docs/full_size_cpu.md);
logs to OUT/logs/. Peak RSS per rank is the kernel's ``VmHWM`` of each rank process, read while it runs.

    bash launch/bench/full_size_cpu.sh /tmp/full_size          # the real thing (~1 h on a 2-core machine)
    bash launch/bench/full_size_cpu.sh /tmp/fs_smoke --smoke   # tiny model, same phases (tests/launch)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import ds_launch  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from anima_ft.runtime import write_json_atomic  # noqa: E402

RECIPE = REPO / "configs" / "anima_full_h100x8.yaml"
TRAINED = ("mod", "llm_adapter")
GB = 2**30


# -- helpers -------------------------------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


class RankWatcher(threading.Thread):
    """Polls /proc for the rank processes under ``root_pid``: their ``VmHWM`` (peak RSS) by rank."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root_pid, self.peak, self.stop = root_pid, {}, threading.Event()

    def _children(self) -> list[int]:
        out, todo = [], [self.root_pid]
        while todo:
            pid = todo.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            out += [int(k) for k in kids]
            todo += [int(k) for k in kids]
        return out

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for pid in self._children():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)
                hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
                if rank is not None and hwm and b"launch/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    self.peak[int(rank)] = max(self.peak.get(int(rank), 0), int(hwm.group(1)) * 1024)


def metrics(run_dir: Path) -> dict[int, dict]:
    """The last metrics.jsonl row of each step (a resumed run appends)."""
    path = run_dir / "metrics.jsonl"
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if "step" in r and "loss" in r:
                    rows[int(r["step"])] = r
    return rows


def log_seconds(log: Path, pattern: str) -> list[float]:
    """Every ``in N s`` figure of log lines matching ``pattern``."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [float(m.group(1)) for line in text.splitlines() if re.search(pattern, line)
            for m in [re.search(r"in (\d+(?:\.\d+)?) s", line)] if m]


# -- phases --------------------------------------------------------------------------------------------------------
def write_model(path: Path, smoke: bool) -> dict:
    """Phase 1 in a child process, so that its peak RSS is its own."""
    code = (f"import json, resource, sys, time; sys.path.insert(0, {str(REPO)!r})\n"
            "from anima_ft.model import AnimaConfig\n"
            "from anima_ft.model.streamed_file import write_random_anima\n"
            f"t = time.time(); n = write_random_anima({str(path)!r}, AnimaConfig.tiny() if {smoke!r} else AnimaConfig(), seed=0)\n"
            "print(json.dumps({'params': n, 'write_s': time.time() - t,"
            " 'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["file_gb"] = path.stat().st_size / GB
    return res


def write_shards(root: Path, samples: int, smoke: bool) -> dict:
    """Phase 2: a target and a replay shard of 256-px samples (the tiny model reads 32-wide Qwen states), written
    by the GPU session's shard writer (``full_size_step.write_shards``: the project's ``ShardWriter``, caption
    lengths drawn per sample)."""
    from full_size_step import write_shards as write_source

    return {name: write_source(root, name, samples, 32, 32 if smoke else 1024, seed)
            for seed, name in enumerate(("target", "replay"), start=1)}


def run_config(out: Path, name: str, model: Path, globs: dict, zero: int, steps: int, every: int, world: int,
               stages: list[dict] | None = None, extra: dict | None = None) -> Path:
    """The recipe with this machine's changes (module docstring), written to ``out/configs/<name>.yaml``."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["run"].update(dir=str(out / "runs" / name), deterministic=True)
    cfg["model"]["init_path"] = str(model)
    cfg["data"].update(num_workers=0, sources=[{"name": "target", "shards": [globs["target"]], "weight": 0.8},
                                               {"name": "replay", "shards": [globs["replay"]], "weight": 0.2}])
    cfg["batch"] = {"micro_batch_size": 1, "grad_accum_steps": 2 // world, "global_batch_size": 2}
    cfg["optim"]["lr"] = {g: (1e-4 if g in TRAINED else 0) for g in cfg["optim"]["lr"]}
    cfg["stages"] = stages or [{"name": "main", "num_steps": steps, "warmup_steps": 0, "decay": "constant"}]
    cfg["dist"].update(zero_stage=zero, backend="gloo")
    cfg["checkpoint"] = {"every_steps": every, "every_minutes": 0, "keep_last": 1, "save_at_end": True}
    cfg["logging"] = {"every_steps": 1, "wandb_mode": "disabled", "progress_bar": False}
    for key, value in (extra or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(out: Path, name: str, config: Path, world: int, timeout: float, kill_after_step: int | None = None) -> dict:
    """Run to the end (or SIGKILL every process once ``kill_after_step``'s checkpoint is complete); a summary."""
    log = out / "logs" / f"{name}.log"
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["dir"])
    t0 = time.time()
    proc = ds_launch.start(["--config", str(config)], log, cpu=True, num_gpus=world, new_session=True)
    watch = RankWatcher(proc.pid)
    watch.start()
    killed = False
    latest = run_dir / "checkpoints" / "latest"
    last_step, last_say = -1, 0.0
    while proc.poll() is None:
        time.sleep(1.0)
        rows = metrics(run_dir)
        if rows and max(rows) != last_step or time.time() - last_say > 60:
            last_step = max(rows) if rows else -1
            last_say = time.time()
            loss = f", loss {rows[last_step]['loss']:.4f}" if rows else ""
            say(f"  {name}: step {last_step if rows else '-'}{loss}, {time.time() - t0:.0f} s")
        if kill_after_step is not None and latest.is_file() and latest.read_text().strip().endswith(
                f"{kill_after_step:08d}"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
            say(f"  {name}: kill -9 of every process after the step-{kill_after_step} checkpoint")
            break
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{name} ran past {timeout:.0f} s; see {log}")
    watch.stop.set()
    watch.join()
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}; see {log}")
    rows = metrics(run_dir)
    step_s = [1.0 / r["samples_per_s"] * 2 for s, r in sorted(rows.items()) if r.get("samples_per_s")]
    return {"wall_s": time.time() - t0, "exit": "killed" if killed else proc.returncode,
            "losses": {s: r["loss"] for s, r in sorted(rows.items())},
            "step_s": step_s, "peak_rss_gb_by_rank": {r: v / GB for r, v in sorted(watch.peak.items())},
            "save_s": log_seconds(log, r"saved checkpoint"), "load_s": log_seconds(log, r"resumed from"),
            "convert_s": log_seconds(log, r"converted .* universal"), "log": str(log), "run_dir": str(run_dir)}


def export_and_compare(out: Path, run_dir: Path, model: Path, trained: tuple[str, ...]) -> dict:
    """``anima-ft export`` then the read-back checks, each in a child process (its own peak RSS)."""
    exported = out / "export" / "zero2.safetensors"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "import resource, sys; from anima_ft.cli import main; rc = main(sys.argv[1:]); "
                           "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
                           "export", str(run_dir), str(exported)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise RuntimeError(f"export failed ({proc.returncode}): {proc.stderr[-2000:]}")
    res = {"export_s": time.time() - t0, "export_peak_rss_gb": int(proc.stdout.split("PEAK")[-1]) / 2**20,
           "export_gb": exported.stat().st_size / GB}
    code = f"""
import json, resource, sys, torch
sys.path.insert(0, {str(REPO)!r})
from safetensors import safe_open
from anima_ft.model import load_anima
from anima_ft.model.groups import lr_group, strip_prefix
m = load_anima({str(exported)!r})
loaded = len(m.state_dict()); del m
changed, same, tensors = {{}}, {{}}, {{}}
with safe_open({str(model)!r}, "pt") as a, safe_open({str(exported)!r}, "pt") as b:
    names_a, names_b = sorted(a.keys()), sorted(b.keys())
    shapes_equal = names_a == names_b and all(a.get_slice(n).get_shape() == b.get_slice(n).get_shape() for n in names_a)
    dtypes = sorted({{b.get_slice(n).get_dtype() for n in names_b}})
    for n in names_a:
        g = lr_group(strip_prefix(n))
        x, y = a.get_tensor(n), b.get_tensor(n)
        tensors[g] = tensors.get(g, 0) + 1
        if torch.equal(x.view(torch.int16), y.view(torch.int16)):
            same[g] = same.get(g, 0) + 1
        else:
            changed[g] = changed.get(g, 0) + 1
print(json.dumps({{"tensors": len(names_a), "loaded_by_load_anima": loaded, "names_and_shapes_equal": shapes_equal,
                  "dtypes": dtypes,
                  "tensors_by_group": tensors, "changed_by_group": changed, "unchanged_by_group": same,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"read-back failed: {check.stderr[-2000:]}")
    cmp = json.loads(check.stdout.strip().splitlines()[-1])
    res.update(cmp)
    frozen = [g for g in cmp["tensors_by_group"] if g not in trained]
    res["frozen_bitwise_equal"] = all(cmp["changed_by_group"].get(g, 0) == 0 for g in frozen)
    res["trained_groups_changed"] = all(cmp["changed_by_group"].get(g, 0) > 0 for g in trained)
    res["official_bf16"] = cmp["dtypes"] == ["BF16"]
    return res


# -- the plan and the check before starting --------------------------------------------------------------------
def plan(smoke: bool) -> dict:
    """Memory per rank for each run and the disk the whole script needs, from ``anima_ft.train.memory_plan``."""
    from anima_ft.model import AnimaConfig
    from anima_ft.model.groups import lr_group
    from anima_ft.model.state_dict import build_anima
    from anima_ft.train.memory_plan import checkpoint_bytes, rank_memory

    model = build_anima(AnimaConfig.tiny() if smoke else AnimaConfig(), device="meta")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if lr_group(n) in TRAINED)
    runs = {"zero2": rank_memory(total, trainable, world=2, zero_stage=2),
            "zero3": rank_memory(total, trainable, world=2, zero_stage=3),
            "universal_1rank": rank_memory(total, trainable, world=1, zero_stage=2)}
    ckpt = checkpoint_bytes(total, trainable)
    # model file + export + (at most) two runs' directories of two checkpoints each (a save before the prune) + the
    # universal copy of one checkpoint's optimizer state
    disk = 2 * total * 2 + 4 * ckpt + trainable * 12
    need_mem = max(2 * runs["zero2"]["total"], 2 * runs["zero3"]["total"], runs["universal_1rank"]["total"])
    return {"params": total, "trainable": trainable, "rank_memory": runs, "checkpoint_bytes": ckpt,
            "need_memory_bytes": need_mem, "need_disk_bytes": disk}


def refuse_if_short(p: dict, out: Path) -> str | None:
    """One line if this machine has less free memory or disk than the plan needs, else None."""
    avail = int(os.environ.get("FULL_SIZE_MEM_AVAILABLE", mem_available()))  # test hook: pretend less memory
    free = int(os.environ.get("FULL_SIZE_DISK_FREE", shutil.disk_usage(out).free))
    if avail < p["need_memory_bytes"]:
        return (f"full_size_cpu: needs {p['need_memory_bytes'] / GB:.1f} GiB of free memory (2 ranks x "
                f"{p['rank_memory']['zero2']['total'] / GB:.1f} GiB, docs/full_size_cpu.md#plan), this machine has "
                f"{avail / GB:.1f} GiB available; stop other jobs or use a larger machine")
    if free < p["need_disk_bytes"]:
        return (f"full_size_cpu: needs {p['need_disk_bytes'] / GB:.1f} GiB of free disk under {out}, it has "
                f"{free / GB:.1f} GiB; pass another OUT_DIR")
    return None


# -- report -----------------------------------------------------------------------------------------------------------
def report_md(res: dict) -> str:
    """The results table (docs/full_size_cpu.md quotes it)."""
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else float("nan")

    lines = [f"CPU: {res['cpu']} ({os.cpu_count()} cores), {res['mem_total_gb']:.1f} GiB RAM; torch "
             f"{torch.__version__}; load average at the start {res['load_start']}", "",
             "| run | ranks | ZeRO | step s (median) | peak RSS per rank GiB | plan per rank GiB | checkpoint save s |"
             " load s |", "|---|---|---|---|---|---|---|---|"]
    plan_of = {"zero2": "zero2", "zero2_killed": "zero2", "zero2_resumed": "zero2", "zero3": "zero3",
               "staged": "zero2", "universal_1rank": "universal_1rank"}
    for name in ("zero2", "zero2_killed", "zero2_resumed", "universal_1rank", "zero3", "staged"):
        r = res["runs"].get(name)
        if not r:
            continue
        p = res["plan"]["rank_memory"][plan_of[name]]["total"] / GB
        rss = ", ".join(f"{v:.2f}" for v in r["peak_rss_gb_by_rank"].values())
        lines.append(f"| {name} | {r['world']} | {r['zero']} | {med(r['step_s'][1:] or r['step_s']):.1f} | {rss} | "
                     f"{p:.2f} | {', '.join(f'{s:.1f}' for s in r['save_s'])} | "
                     f"{', '.join(f'{s:.1f}' for s in r['load_s'] + r['convert_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="the tiny model through the same phases (fast)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per training run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (else deleted once measured)")
    ap.add_argument("--runs", default="", help="comma-separated subset of zero2,zero3,staged to (re)run into an "
                    "existing OUT (the model and shards are reused when present; results.json is updated); "
                    "zero2 includes the export, the kill -9 resume and the 1-rank universal resume")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # per rank, as launch/bench/full_size_cpu.sh sets it
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = plan(args.smoke)
    if args.runs:  # the model file and the export of an earlier run are already on disk
        p["need_disk_bytes"] = max(0, p["need_disk_bytes"] - du(out / "model") - du(out / "export"))
    line = refuse_if_short(p, out)
    if line:
        print(line, file=sys.stderr)
        return 2
    res_path = out / "results.json"
    chosen = set(filter(None, args.runs.split(","))) or {"zero2", "zero3", "staged"}
    if chosen - {"zero2", "zero3", "staged"}:
        print(f"full_size_cpu: --runs {args.runs!r}: choose from zero2, zero3, staged", file=sys.stderr)
        return 2
    res = {"cpu": cpu_model(), "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
           "load_start": os.getloadavg(), "smoke": args.smoke, "plan": p, "runs": {}, "trained_groups": TRAINED}
    if args.runs and res_path.is_file():
        res = dict(json.loads(res_path.read_text()), plan=p, load_start=os.getloadavg())

    def save():
        write_json_atomic(res_path, res)
        (out / "results.md").write_text(report_md(res))

    say(f"plan: {p['params']:,} parameters, {p['trainable']:,} trainable; needs {p['need_memory_bytes'] / GB:.1f} GiB "
        f"memory, {p['need_disk_bytes'] / GB:.1f} GiB disk")
    model = out / "model" / "anima_random.safetensors"
    if not (args.runs and model.is_file()):
        say("writing the random model")
        res["model"] = write_model(model, args.smoke)
        save()
        say(f"model: {res['model']}")
    globs = write_shards(out / "shards", 64, args.smoke)
    steps, every = args.steps, args.every

    def run(name, world, zero, kill=None, **kw):
        cfg = run_config(out, name if not name.startswith("zero2_") else "zero2_killed", model, globs, zero,
                         kw.pop("steps", steps), kw.pop("every", every), world, **kw)
        say(f"{name}: {world} rank(s), ZeRO-{zero}")
        r = train(out, name, cfg, world, args.timeout, kill_after_step=kill)
        r.update(world=world, zero=zero)
        res["runs"][name] = r
        save()
        return r

    if "zero2" in chosen:
        zero2_phases(args, out, res, run, save, model, steps, every)
    if "zero3" in chosen:
        z = run("zero3", 2, 3, steps=3, every=0)
        a_losses = {int(k): v for k, v in res["runs"].get("zero2", {}).get("losses", {}).items()}
        res["zero3_vs_zero2"] = {s: (z["losses"][s], a_losses[s]) for s in z["losses"] if s in a_losses}
        save()
        if not args.keep:
            shutil.rmtree(z["run_dir"])
    if "staged" in chosen:
        staged_phase(args, res, run, steps)
    res["done"] = True
    save()
    say(f"done: {out / 'results.md'}")
    print((out / "results.md").read_text())
    ok = res.get("resume_losses_equal", True) and all(res.get("export", {}).get(k, True) for k in (
        "frozen_bitwise_equal", "trained_groups_changed", "names_and_shapes_equal", "official_bf16"))
    return 0 if ok else 1


def zero2_phases(args, out: Path, res: dict, run, save, model: Path, steps: int, every: int) -> None:
    """ZeRO-2 uninterrupted + export, killed + resumed (bitwise), then one rank from its last checkpoint."""
    a = run("zero2", 2, 2)
    res["export"] = export_and_compare(out, Path(a["run_dir"]), model, TRAINED)
    res["runs"]["zero2"]["checkpoint_gb"] = du(Path(a["run_dir"]) / "checkpoints") / GB
    save()
    say(f"export: {res['export']}")
    if not args.keep:
        shutil.rmtree(a["run_dir"])
    run("zero2_killed", 2, 2, kill=every)
    b = run("zero2_resumed", 2, 2)
    res["resume_bitwise"] = {s: (b["losses"].get(s), a["losses"][s]) for s in a["losses"] if s > every}
    res["resume_losses_equal"] = all(x == y for x, y in res["resume_bitwise"].values())
    save()
    say(f"kill -9 + resume, losses of steps {every + 1}..{steps} bitwise equal: {res['resume_losses_equal']}")
    last = Path(b["run_dir"]) / "checkpoints" / f"step_{steps:08d}"
    run("universal_1rank", 1, 2, steps=steps + 2, every=0,
        extra={"checkpoint.resume": str(last)})
    if not args.keep:
        shutil.rmtree(b["run_dir"])
        shutil.rmtree(out / "runs" / "universal_1rank", ignore_errors=True)


def staged_phase(args, res: dict, run, steps: int) -> None:
    """Stage 1 trains mod with the adapter frozen; stage 2 unfreezes llm_adapter (the engine is rebuilt)."""
    half = max(1, steps // 2)
    r = run("staged", 2, 2, steps=2 * half, every=0, stages=[
        {"name": "adapter_frozen", "num_steps": half, "lr": {"llm_adapter": 0}, "warmup_steps": 0,
         "decay": "constant", "replay_fraction": 0.1},
        {"name": "with_adapter", "num_steps": half, "lr": {"llm_adapter": 1e-4}, "warmup_steps": 0,
         "decay": "constant", "replay_fraction": 0.25}])
    res["staged_log"] = [ln for ln in Path(r["log"]).read_text().splitlines()
                         if "stage 0 -> 1" in ln or "trainable elements per group" in ln][:4]
    if not args.keep:
        shutil.rmtree(r["run_dir"])


if __name__ == "__main__":
    sys.exit(main())
