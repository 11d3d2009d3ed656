"""The GPU-session helpers (launch/bench/) on CPU: the peer's FLOP formula, the full-size one-GPU config derived from
the 8-GPU recipe (it must stay valid as the schema changes), the resume comparison and the summary rendering."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch" / "bench"))

import full_size_step  # noqa: E402
import peer_ref  # noqa: E402
import resume_check  # noqa: E402
import session_summary  # noqa: E402

from anima_ft.config import load_config, validate  # noqa: E402

# ../shared/baselines/h100_peer_2026-11-26.json: "train_flops_per_image_1024"
PEER_FLOPS_PER_IMAGE_1024 = 53755810676736


def test_flops_formula_matches_the_peer_number():
    assert peer_ref.flops_per_image() == PEER_FLOPS_PER_IMAGE_1024


@pytest.mark.parametrize("smoke", [True, False])
def test_full_size_session_config_is_valid_for_one_rank(tmp_path, smoke):
    path = full_size_step.session_config(tmp_path, steps=3, smoke=smoke)
    cfg = load_config(path, [])
    validate(cfg, 1)
    assert cfg.model.init_path == "" and cfg.model.size == ("tiny" if smoke else "full")
    assert (cfg.batch.micro_batch_size, cfg.batch.grad_accum_steps, cfg.dist.zero_stage) == (1, 1, 2)
    assert cfg.dist.activation_checkpointing == 1.0 and cfg.checkpoint.save_at_end is False
    assert cfg.dist.precision == ("fp32" if smoke else "bf16")
    index = json.loads(next((tmp_path / "shards" / "target").glob("*.index.json")).read_text())
    assert index["num_samples"] == 7 and index["qwen_dim"] == (32 if smoke else 1024)
    assert index["buckets"] == ({"128x128": 7} if smoke else {"1024x1024": 7})


def test_resume_comparison_splits_rows_before_and_after_the_kill(tmp_path):
    rows = [(1, 1.0), (2, 0.9), (3, 0.8), (2, 0.9), (3, 0.8000001), (4, 0.7)]  # killed in step 4, resumed from 1
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in rows))
    first, last = resume_check.losses(path)
    assert first[3] == 0.8 and last[3] == 0.8000001 and last[4] == 0.7
    c = resume_check.compare(last, {1: 1.0, 2: 0.9, 3: 0.8, 4: 0.7}, [2, 3, 4])
    assert c["steps"] == [2, 3, 4] and c["max_abs"] == pytest.approx(1e-7) and not c["bitwise_equal"]


def test_summary_renders_ratios_and_missing_steps(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "peer").mkdir(parents=True)
    (work / "peer" / "baseline.json").write_text(json.dumps({
        "gpu": "H100", "torch": "2.11", "matmul_bf16_tflops": 700.0,
        "diffusers_dit_bs1_ckpt1": {"img_per_s": 2.0, "peak_mem_gb": 8.0}}))
    (work / "model.json").write_text(json.dumps({"params": 1956405248, "flops_per_image": 5.0e13, "rows": [
        {"name": "sdpa_bs1_ckpt1", "batch": 1, "ckpt": True, "compiled": False, "step_s": 0.25, "img_per_s": 4.0,
         "peer_img_per_s": 2.0, "ratio_vs_peer": 2.0, "peer_source": "same run"}], "mfu_peak_tflops": 700.0}))
    (work / "steps.jsonl").write_text(json.dumps({"step": "model", "status": "ok", "seconds": 10, "limit_s": 99}))
    assert session_summary.main(["--work", str(work), "--out", str(out), "--stored-peer", ""]) == 0
    md = (out / "gpu_session.md").read_text()
    assert "measured in this run on H100" in md and "| sdpa_bs1_ckpt1 | 1 | 1 | 0.250 | 4.00 |" in md
    assert "x2.00" in md
    assert md.count("No results") == 3  # kernels, resume and full-size steps left nothing
    summary = json.loads((out / "gpu_session.json").read_text())
    assert summary["peer_source"] == peer_ref.PEER_SAME_CALL and summary["model"]["rows"][0]["ratio_vs_peer"] == 2.0
