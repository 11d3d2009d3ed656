"""The GPU session's summary: every step's numbers and their ratio to the peer's, as markdown and JSON.

Reads what ``gpu_session.sh`` left in its work directory (each file may be missing or partial: a step that timed out
or was skipped shows as such) and writes ``OUT/gpu_session.md`` and ``OUT/gpu_session.json``. It imports no torch,
so it can run after every step; ``--env FILE`` (once, at the start) records the card, driver and versions.

    python launch/bench/session_summary.py --work /tmp/gpu_session --out $OUT
    python launch/bench/session_summary.py --env /tmp/gpu_session/env.json

Ratios: kernels ``peer ms / our ms`` (> 1 = ours faster); whole model ``our img/s / peer img/s`` (> 1 = ours
faster); memory ``our GB / peer GB``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_ref import PEER_SAME_CALL, flops_per_image, load_peer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STORED_PEER = REPO / ".peer" / "h100_peer_2026-11-26.json"


def write_env(path: Path) -> None:
    """Card, driver, torch / triton / CUDA / Python versions (imports torch; run once)."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "host_cpus": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for name in ("deepspeed", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # a missing wheel is a finding, not a crash
            env[name] = f"unavailable: {exc!r}"[:120]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(card=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            env["driver"], env["max_sm_clock"], env["power_limit"] = [s.strip() for s in q.split(",")][:3]
        except Exception as exc:
            env["driver"] = f"nvidia-smi failed: {exc!r}"[:120]
    else:
        env.update(card="none (CPU smoke run)", driver="-")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(env, indent=1))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _steps(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(x, nd: int = 3) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** (-nd) or x == 0 else f"{x:.2e}"
    return str(x)


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


# -- sections ------------------------------------------------------------------------------------------------------
KERNEL_PEER = {"self": [("peer SDPA cuDNN", "attn_self_cudnn"), ("peer QK-norm+RoPE+SDPA", "prologue_qknorm_rope_sdpa")],
               "cross": [("peer SDPA cuDNN", "attn_cross_cudnn")]}


def kernels_section(k: dict, peer: dict, peer_label: str) -> tuple[list[str], list[dict]]:
    md = ["## 1. Kernels (kernels/bench/gpu_check.py)", ""]
    if not k:
        return md + ["No results (step not run, or killed before its first write).", ""], []
    md += [f"bf16 correctness (`pytest -m gpu tests/kernels`): {k.get('tests', {}).get('summary', '-')}", ""]
    md += [f"Ratios are peer ms / our ms (> 1 = ours faster); peer attention numbers: {peer_label}. adaLN rows "
           "compare with eager PyTorch in this same process.", "",
           "| case | shape | variant | fwd ms | fwd+bwd ms | fwd TFLOP/s | vs peer (fwd+bwd) | note |",
           "|---|---|---|---|---|---|---|---|"]
    rows = []
    eager = {r["case"]: r for r in k.get("ours", []) if r.get("variant") == "eager_reference"}
    for r in k.get("ours", []):
        cmp = []
        for label, key in KERNEL_PEER.get(r.get("case"), []):
            ref = peer.get(key, {})
            ratio = _ratio(ref.get("fwdbwd_ms"), r.get("fwdbwd_ms"))
            if ratio is not None:
                cmp.append(f"{label} {ref['fwdbwd_ms']:.3f} ms: x{ratio:.2f}")
        if r.get("case") in eager and r.get("variant") == "ours":
            ratio = _ratio(eager[r["case"]].get("fwdbwd_ms"), r.get("fwdbwd_ms"))
            if ratio is not None:
                cmp.append(f"eager: x{ratio:.2f}")
        note = r.get("error", "")[:60].replace("|", "/").replace("\n", " ")
        if "rel_err_vs_ref" in r:
            note = f"rel err {r['rel_err_vs_ref']:.1e}"
        md.append(f"| {r.get('case')} | {r.get('shape', '')} | {r.get('variant')} | {_f(r.get('fwd_ms'))} | "
                  f"{_f(r.get('fwdbwd_ms'))} | {_f(r.get('fwd_tflops'), 0)} | {'; '.join(cmp) or '-'} | {note} |")
        rows.append({**r, "vs_peer": cmp})
    md += ["", "Targets (gpu_check.py):"] + [f"- {v}" for v in k.get("verdicts", [])] + [""]
    return md, rows


def model_section(m: dict, compiled: dict) -> list[str]:
    """``m``: the eager configurations; ``compiled``: the compiled variant's run (a later step, may be empty)."""
    md = ["## 2. Whole model: our full-size DiT train step at the peer's shapes (launch/bench/model_throughput.py)",
          ""]
    if not m and not compiled:
        return md + ["No results (step not run, or killed before its first write).", ""]
    rows = m.get("rows", []) + compiled.get("rows", [])
    runs = [run for run in (m, compiled) if run]
    m = m or compiled  # the header's model facts
    md += [f"DiT alone, {m.get('params', 0):,} parameters, {m.get('dtype')}, latents {m.get('latent')}, "
           f"context {m.get('context')}; {m.get('flops_per_image', 0) / 1e12:.2f} TFLOP per image (the peer's formula); "
           f"MFU against {_f(m.get('mfu_peak_tflops'), 0)} TFLOP/s ({m.get('mfu_peak_source')}; our own matmul "
           f"measurement: {_f(m.get('our_matmul_tflops'), 0)}). Peer numbers: {m.get('peer_source')}.", "",
           "| variant | batch | ckpt | step s | img/s | peak GB | MFU | peer img/s | ours/peer img/s | peer peak GB | "
           "peer source | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error", "")[-80:].replace("|", "/").replace("\n", " ")
        if r.get("compiled"):
            note = f"first step (compile) {_f(r.get('first_step_s'), 1)} s"
            if r.get("peer_compile_s") is not None:
                note += f"; peer compile {_f(r['peer_compile_s'], 1)} s"
        ratio = r.get("ratio_vs_peer")
        md.append(f"| {r['name']} | {r['batch']} | {int(r['ckpt'])} | {_f(r.get('step_s'))} | {_f(r.get('img_per_s'), 2)} "
                  f"| {_f(r.get('peak_mem_gb'), 1)} | {_f(r.get('mfu'))} | {_f(r.get('peer_img_per_s'), 2)} | "
                  f"{f'x{ratio:.2f}' if ratio else '-'} | {_f(r.get('peer_peak_mem_gb'), 1)} | "
                  f"{r.get('peer_source', '-')} | {note} |")
    for run in runs:
        for s in run.get("skipped", []):
            md.append(f"- skipped: {s}")
        if run.get("in_progress"):
            p = run["in_progress"]
            end = run.get("ended_unix")
            md.append(f"- still running when its step ended: {p['name']}"
                      + (f" ({end - p['since_unix']:.0f} s after it started)" if end else ""))
        if run.get("compile_error"):
            md.append(f"- compiled variant failed: `{run['compile_error'][-300:]}`".replace("\n", " "))
    if not compiled:
        md.append("- compiled variant: not run (the `compile` step runs last, in the time left)")
    return md + [""]


def resume_section(r: dict) -> list[str]:
    md = ["## 3. Trainer on the GPU: kill + resume, ZeRO-3 (launch/bench/resume_check.py)", ""]
    if not r:
        return md + ["No results (step not run, or killed before its first write).", ""]
    md += [f"`deepspeed --num_gpus 1 launch/train.py --config {r.get('config')} {' '.join(r.get('overrides', []))}`; "
           f"run B killed during 0-based step {r.get('kill_at_step_index')} (last checkpoint "
           f"{r.get('B_checkpoint_at_kill')}) and resumed. Exit codes: {r.get('exit_codes')} (B_killed is expected "
           f"to be non-zero).", ""]
    if any(rc != 0 for name, rc in r.get("exit_codes", {}).items() if name != "B_killed"):
        md += ["**Some runs did not finish**: the comparisons below use only the rows they logged.", ""]
    md += ["| comparison | steps | max abs loss diff | max rel loss diff | bitwise equal |",
           "|---|---|---|---|---|"]
    for key, label in (("resume_vs_uninterrupted", "resumed B vs uninterrupted A (the resume tolerance)"),
                       ("identical_runs_before_kill", "B before the kill vs A (identical runs)"),
                       ("zero3_vs_zero2", "ZeRO-3 vs ZeRO-2 (A)")):
        c = r.get(key)
        if c is None:
            md.append(f"| {label} | not run | - | - | - |")
            continue
        steps = c.get("steps", [])
        span = f"{steps[0]}-{steps[-1]}" if steps else c.get("note", "-")
        md.append(f"| {label} | {span} | {_f(c.get('max_abs'), 3)} | {_f(c.get('max_rel'), 3)} | "
                  f"{c.get('bitwise_equal', '-')} |")
    return md + [""]


def full_section(f: dict, model: dict, peer: dict) -> tuple[list[str], dict]:
    md = ["## 4. Full-size recipe through the trainer, 1 GPU (launch/bench/full_size_step.py)", ""]
    if not f:
        return md + ["No results (step not run, or killed before its first write).", ""], {}
    cfg = f.get("config", {})
    d = cfg.get("dist", {})
    md += [f"{f.get('recipe')} with random init ({cfg.get('model', {}).get('size')}), ZeRO-{d.get('zero_stage')}, "
           f"{d.get('precision')}, activation checkpointing {d.get('activation_checkpointing')}, micro batch 1, "
           f"synthetic shards (target 0.8 / replay 0.2; 1024^2 on the GPU). Exit code {f.get('exit_code')}, wall "
           f"{_f(f.get('wall_s'), 1)} s, launch to engine ready {_f(f.get('launch_to_engine_s'), 1)} s.", "",
           "| step | loss | step s | peak GB | grad norm |", "|---|---|---|---|---|"]
    for s in f.get("steps", []):
        md.append(f"| {s.get('step')} | {_f(s.get('loss'), 4)} | {_f(s.get('step_s'))} | {_f(s.get('peak_mem_gb'), 1)} "
                  f"| {_f(s.get('grad_norm'), 3)} |")
    extra: dict = {}
    ips = f.get("img_per_s")
    fpi = model.get("flops_per_image") or (flops_per_image() if not f.get("smoke") else None)
    peak = model.get("mfu_peak_tflops") or peer.get("matmul_bf16_tflops")
    if ips and fpi and peak:
        extra["mfu_peer_formula"] = ips * fpi / (peak * 1e12)
    ref = peer.get("diffusers_dit_bs1_ckpt1", {})
    extra["ratio_vs_peer_bs1_ckpt1"] = _ratio(ips, ref.get("img_per_s"))
    extra["mem_ratio_vs_peer_bs1_ckpt1"] = _ratio(f.get("peak_mem_gb"), ref.get("peak_mem_gb"))
    md += ["", f"Median step (steps 2+): {_f(f.get('median_step_s'))} s = {_f(ips, 2)} img/s; MFU (peer formula) "
           f"{_f(extra.get('mfu_peer_formula'))}; vs the peer's bs1 checkpointed fwd+bwd (no optimizer, no data): "
           f"img/s x{_f(extra.get('ratio_vs_peer_bs1_ckpt1'), 2)}, peak memory x{_f(extra.get('mem_ratio_vs_peer_bs1_ckpt1'), 2)} "
           f"(ours holds fp32 master weights and Adam state too).", ""]
    return md, extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="gpu_session.sh's work directory")
    ap.add_argument("--out", help="where gpu_session.md / .json go")
    ap.add_argument("--stored-peer", default=str(STORED_PEER))
    ap.add_argument("--env", type=Path, default=None, help="only write the environment JSON to this file")
    args = ap.parse_args(argv)
    if args.env is not None:
        write_env(args.env)
        return 0
    work, out = Path(args.work), Path(args.out)
    env = _read(work / "env.json")
    steps = _steps(work / "steps.jsonl")
    peer, label = load_peer(work / "peer" / "baseline.json", args.stored_peer)
    kernels, model = _read(work / "kernels" / "gpu_check.json"), _read(work / "model.json")
    compiled = _read(work / "model_compiled.json")
    steps_by_name = {s.get("step"): s for s in steps}
    for run, step in ((model, "model"), (compiled, "compile")):  # when the step that wrote it ended (for in_progress)
        if run and step in steps_by_name and "end_unix" in steps_by_name[step]:
            run["ended_unix"] = steps_by_name[step]["end_unix"]
    resume, full = _read(work / "resume.json"), _read(work / "full.json")
    plan = _read(work / "plan.json")

    smoke = bool(plan.get("smoke"))
    md = [f"# anima_ft GPU session{' (SMOKE RUN ON CPU: numbers meaningless)' if smoke else ''}", "",
          "| card | driver | torch | triton | CUDA | Python | deepspeed | diffusers | UTC |", "|---|---|---|---|---|---|---|---|---|",
          f"| {env.get('card', '-')} | {env.get('driver', '-')} | {env.get('torch', '-')} | {env.get('triton', '-')} | "
          f"{env.get('cuda', '-')} | {env.get('python', '-')} | {env.get('deepspeed', '-')} | {env.get('diffusers', '-')} "
          f"| {env.get('time_utc', '-')} |", ""]
    peer_note = plan.get("peer_note", "")
    if label == PEER_SAME_CALL:
        md.append(f"Peer (`.peer/peer_baseline.py`): measured in this run on {peer.get('gpu', '?')}, torch "
                  f"{peer.get('torch', '?')}, bf16 matmul {_f(peer.get('matmul_bf16_tflops'), 0)} TFLOP/s. {peer_note}")
    else:
        md.append(f"Peer: NOT measured in this run; ratios use {label} ({args.stored_peer}). {peer_note}")
    md += ["", "| step | status | seconds | limit s |", "|---|---|---|---|"]
    md += [f"| {s.get('step')} | {s.get('status')} | {_f(s.get('seconds'), 1)} | {_f(s.get('limit_s'), 0)} |"
           for s in steps]
    md.append("")
    # the kernel check's own peer numbers (read from this run's peer file, or measured in its process) come first
    kpeer, klabel = kernels.get("peer", {}), "measured in this run"
    if "attn_self_cudnn" not in kpeer:
        kpeer, klabel = peer, label
    k_md, k_rows = kernels_section(kernels, kpeer, klabel)
    f_md, f_extra = full_section(full, model, peer)
    md += k_md + model_section(model, compiled) + resume_section(resume) + f_md
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_session.md").write_text("\n".join(md) + "\n")
    summary = {"env": env, "plan": plan, "steps": steps, "peer_source": label,
               "peer": {k: v for k, v in peer.items() if not k.startswith("_")},
               "kernels": {"tests": kernels.get("tests"), "rows": k_rows, "verdicts": kernels.get("verdicts"),
                           "autotune": kernels.get("autotune")},
               "model": model, "model_compiled": compiled, "resume": {k: v for k, v in resume.items()}, "full_size": {**full, **f_extra}}
    (out / "gpu_session.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
