"""One-command GPU check for kernels/: bf16 correctness tests, kernel timings, and the peer baseline beside them.

Usage (from the repository root, on the GPU machine; see kernels/bench/run_gpu.sh)::

    python3 kernels/bench/gpu_check.py [--out DIR] [--peer PATH/peer_baseline.py] [--peer-full] [--skip-tests]
    python3 kernels/bench/gpu_check.py --peer-json DIR/baseline.json    # peer numbers from a peer run of this run
    TRITON_INTERPRET=1 python kernels/bench/gpu_check.py --smoke --skip-tests    # exercise the script on CPU

Steps, each recorded even when another fails:

1. ``pytest -m gpu tests/kernels`` (bf16 outputs and gradients vs float64); log in ``DIR/pytest_gpu.log``.
2. The peer baseline's measurements in this same process: sections 1-3 of ``peer_baseline.py`` (bf16 matmul
   ceiling, SDPA backends at B4 H16 S4096 D128 self and Skv 512 cross, unfused QK-norm+RoPE around SDPA).
   ``--peer-full`` instead runs the whole file in a subprocess (needs diffusers; several minutes), and
   ``--peer-json`` reads the ``baseline.json`` of a peer run already made in this same run (launch/bench/
   gpu_session.sh runs the peer once for this check and the whole-model benchmark). A missing file is recorded and
   the run goes on.
3. Our kernels vs the plain-PyTorch path (per SDPA backend) and SDPA alone, and the adaLN kernels vs eager.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (the table for kernels/README.md) after every step, so a run
killed by a time limit keeps what finished, and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from anima_kernels.bench import cases  # noqa: E402

PEER_SEARCH = ["shared/bench/peer_baseline.py", ".peer/peer_baseline.py", "../shared/bench/peer_baseline.py"]


def _env() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
    return info


def run_tests(out_dir: Path, timeout_s: float = 300) -> dict:
    """``pytest -m gpu tests/kernels`` in a subprocess; returns rc and pytest's summary line."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/kernels", "-q", "-rA", "-p", "no:cacheprovider"]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        log = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout or "")
        (out_dir / "pytest_gpu.log").write_text(log)
        return {"rc": "timeout", "seconds": round(time.time() - t0, 1), "summary": f"timeout after {timeout_s:.0f} s",
                "log_tail": log[-2000:]}
    log = res.stdout + res.stderr
    (out_dir / "pytest_gpu.log").write_text(log)
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    return {"rc": res.returncode, "seconds": round(time.time() - t0, 1), "summary": lines[-1] if lines else ""}


def find_peer(path: str | None) -> Path | None:
    """The peer script: ``--peer``, ``$PEER_BASELINE``, or the first of ``PEER_SEARCH`` that exists."""
    for cand in [path, os.environ.get("PEER_BASELINE"), *PEER_SEARCH]:
        if cand and (REPO / cand if not os.path.isabs(cand) else Path(cand)).is_file():
            return REPO / cand if not os.path.isabs(cand) else Path(cand)
    return None


def read_peer_json(path: str) -> dict:
    """Peer numbers from the ``baseline.json`` of a peer run made earlier in this same run."""
    try:
        peer = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"--peer-json {path}: {exc!r}"[:400]}
    return {**peer, "from": str(path)}


def run_peer(path: Path | None, full: bool, out_dir: Path) -> dict:
    """Peer numbers measured now, on this GPU. Sections 1-3 exec'd in-process unless ``full``."""
    if path is None:
        return {"error": f"peer_baseline.py not found (looked in --peer, $PEER_BASELINE, {PEER_SEARCH})"}
    if full:
        env = {**os.environ, "OUT": str(out_dir), "COMPILE": os.environ.get("COMPILE", "0")}
        try:
            subprocess.run([sys.executable, str(path)], env=env, timeout=420, check=False)
            return json.loads((out_dir / "baseline.json").read_text())
        except Exception as exc:
            return {"error": f"full peer run failed: {exc!r}"[:400]}
    src = path.read_text()
    marker = "# ---- 4."
    if marker not in src:
        return {"error": f"{path} has no '{marker}' section marker; run with --peer-full"}
    ns: dict = {"__name__": "peer_baseline", "__file__": str(path)}
    try:
        exec(compile(src[: src.index(marker)], str(path), "exec"), ns)
    except Exception:
        return {"error": traceback.format_exc()[-1500:], "partial": ns.get("res", {})}
    finally:
        torch.cuda.empty_cache()
    return dict(ns["res"])


def run_ours(smoke: bool, on_row=lambda rows: None) -> list[dict]:
    """Every benchmark case; a failing case is recorded as an error row. ``on_row(rows)`` runs after each case."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16 dot is unreliable
    rows: list[dict] = []
    jobs = [(cases.attention_case, k) for k in ("self", "cross", "adapter")]
    jobs += [(cases.adaln_case, fused) for fused in (False, True)]
    for fn, arg in jobs:
        try:
            rows += fn(arg, smoke, device, dtype)
        except Exception:
            rows.append({"case": str(arg), "variant": f"ours ({fn.__name__} failed)", "error": traceback.format_exc()[-1500:]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        on_row(rows)
    return rows


def _autotune_choices() -> dict:
    """The configs Triton's autotuner picked, per kernel and key (empty under the interpreter)."""
    from anima_kernels import flash

    out = {}
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        cache = getattr(getattr(flash, name), "cache", None)
        if cache:
            out[name] = {str(k): str(v) for k, v in cache.items()}
    return out


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def verdicts(rows: list[dict], peer: dict) -> list[str]:
    """The issue's targets, checked against the numbers of this run."""
    get = lambda case, var: next((r for r in rows if r.get("case") == case and r["variant"] == var), {})

    def best(case):  # the fastest of our variants (default, saved prologue, atomic dq), by fwd+bwd time
        ours = [r for r in rows if r.get("case") == case and r["variant"].startswith("ours_fused") and
                "fwdbwd_ms" in r]
        return min(ours, key=lambda r: r["fwdbwd_ms"]) if ours else {}

    lines = []
    s = best("self")
    if s:
        lines.append(f"fastest self-attn variant: {s['variant']}; fastest cross-attn variant: "
                     f"{best('cross').get('variant')} (set the module flags to match if not the default)")
    if "fwdbwd_ms" in s:
        lines.append(f"self-attn fused fwd+bwd {s['fwdbwd_ms']:.3f} ms (target <= 4.0): "
                     f"{'PASS' if s['fwdbwd_ms'] <= 4.0 else 'FAIL'}")
        lines.append(f"self-attn fused fwd {s['fwd_tflops']:.0f} TFLOP/s (target >= 450): "
                     f"{'PASS' if s['fwd_tflops'] >= 450 else 'FAIL'}")
    c, cu = best("cross"), get("cross", "sdpa_only_cudnn")
    if "fwdbwd_ms" in c and "fwdbwd_ms" in cu:
        lines.append(f"cross-attn fused fwd+bwd {c['fwdbwd_ms']:.3f} ms vs cuDNN SDPA alone {cu['fwdbwd_ms']:.3f} ms: "
                     f"{'PASS' if c['fwdbwd_ms'] <= cu['fwdbwd_ms'] else 'FAIL'}")
    for case in ("modulated_ln", "gated_residual_modulated_ln"):
        o, e = get(case, "ours"), get(case, "eager_reference")
        if "fwdbwd_ms" in o and "fwdbwd_ms" in e:
            sp_f, sp_fb = e["fwd_ms"] / o["fwd_ms"], e["fwdbwd_ms"] / o["fwdbwd_ms"]
            lines.append(f"{case}: {sp_f:.2f}x fwd, {sp_fb:.2f}x fwd+bwd vs eager (target >= 2x): "
                         f"{'PASS' if min(sp_f, sp_fb) >= 2 else 'FAIL'}")
    p = peer.get("prologue_qknorm_rope_sdpa", {})
    if "fwdbwd_ms" in p and "fwdbwd_ms" in s:
        lines.append(f"peer unfused QK-norm+RoPE+SDPA fwd+bwd {p['fwdbwd_ms']:.3f} ms (same run) -> "
                     f"ours is {p['fwdbwd_ms'] / s['fwdbwd_ms']:.2f}x faster")
    return lines


def markdown(env: dict, tests: dict, rows: list[dict], peer: dict) -> str:
    """The results table (plus environment, test result, peer attention numbers and verdicts)."""
    md = [f"GPU: {env.get('gpu', 'none (smoke run)')}; torch {env['torch']}; triton {env['triton']}; "
          f"CUDA {env['cuda']}; {env['time_utc']} UTC", "",
          f"bf16 correctness (`pytest -m gpu tests/kernels`): {tests.get('summary', tests)}", "",
          "| case | shape | variant | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error", "")[:80].replace("|", "/").replace("\n", " ")
        if "rel_err_vs_ref" in r:
            note = f"rel err vs ref {r['rel_err_vs_ref']:.1e}"
        md.append(f"| {r.get('case')} | {r.get('shape', '')} | {r['variant']} | {_fmt(r.get('fwd_ms'))} | "
                  f"{_fmt(r.get('fwd_tflops'), 0)} | {_fmt(r.get('fwdbwd_ms'))} | {_fmt(r.get('fwdbwd_tflops'), 0)} "
                  f"| {note} |")
    md += ["", "Peer baseline, same run:" if "error" not in peer else f"Peer baseline: {peer['error'][:300]}"]
    for k, v in peer.items():
        if isinstance(v, dict) and ("fwd_ms" in v or "error" in v):
            md.append(f"- {k}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in v.items()))
        elif k == "matmul_bf16_tflops":
            md.append(f"- bf16 matmul ceiling: {v:.0f} TFLOP/s")
    md += ["", "Targets:"] + [f"- {ln}" for ln in verdicts(rows, peer)]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when the tests passed (or were skipped) and every case produced numbers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/kernels_gpu_check"), help="output directory")
    ap.add_argument("--peer", default=None, help="path to peer_baseline.py (default: search PEER_SEARCH)")
    ap.add_argument("--peer-full", action="store_true", help="run the whole peer script (diffusers DiT steps too)")
    ap.add_argument("--peer-json", default=None,
                    help="baseline.json of a peer run made earlier in this session (used instead of running the peer)")
    ap.add_argument("--tests-timeout", type=float, default=300, help="seconds allowed for the pytest step")
    ap.add_argument("--skip-tests", action="store_true", help="skip the bf16 pytest step")
    ap.add_argument("--skip-peer", action="store_true", help="skip the peer baseline")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32: exercise the script on CPU")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _env()
    print("env", env, flush=True)
    tests: dict = {"summary": "not run yet"}
    peer: dict = {"error": "not run yet"}

    def write(rows: list[dict]) -> str:  # after every step: a run killed by a time limit keeps what finished
        result = {"env": env, "tests": tests, "ours": rows, "peer": peer, "autotune": _autotune_choices(),
                  "verdicts": verdicts(rows, peer)}
        (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        md = markdown(env, tests, rows, peer)
        (out_dir / "gpu_check.md").write_text(md)
        return md

    tests = {"summary": "skipped"} if args.skip_tests else run_tests(out_dir, args.tests_timeout)
    print("tests", tests, flush=True)
    write([])
    if args.skip_peer or args.smoke:
        peer = {"error": "skipped"}
    elif args.peer_json and Path(args.peer_json).is_file():
        peer = read_peer_json(args.peer_json)
    else:  # no finished peer run in this run: measure its attention part here
        peer = run_peer(find_peer(args.peer), args.peer_full, out_dir)
    write([])
    rows = run_ours(args.smoke, on_row=write)
    md = write(rows)
    print(md, flush=True)
    failed_case = any("error" in r and r["variant"].startswith("ours") for r in rows)
    return 0 if tests.get("rc", 0) == 0 and not failed_case else 1


if __name__ == "__main__":
    sys.exit(main())
