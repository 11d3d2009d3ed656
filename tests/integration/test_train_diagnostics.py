"""The trainer's diagnostics and distillation wiring, end to end through launch/train.py (a world of one).

The probe runs at step 0 (before any update) and every N steps; its step-0 value equals a direct probe of the
seeded initial model; relative values survive a kill -9 resume (baseline restored); drift starts at 0; the
forgetting budget stops the run; the distillation objective replaces the flow loss.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from anima_ft.observability import read_metrics
from tests.distributed.conftest import REPO, TRAIN, run_env
from tests.integration.test_train_runs import _write_shards

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _single(args, env=None, timeout=240):
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=run_env(env), capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    _write_shards(root / "target", "target", 12)
    _write_shards(root / "replay", "replay", 12)
    return root


def _args(run, shards, *extra):
    return ["--config", TINY, f"run.dir={run}", "num_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=0",
            f"data.sources=[{{name: target, shards: ['{shards}/target/*.tar']}}, "
            f"{{name: replay, shards: ['{shards}/replay/*.tar']}}]",
            f"eval.sets=[{{name: replay, path: '{shards}/replay'}}]", "eval.probe_every_steps=2",
            "eval.max_samples_per_set=4", "eval.num_noises=2", "eval.drift_every_steps=2", "run.deterministic=false",
            *extra]


@pytest.mark.multiproc
def test_probe_drift_at_step_zero_and_every_n_steps(tmp_path, shards):
    run = tmp_path / "run"
    rc, out = _single(_args(run, shards))
    assert rc == 0, out[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    for s in (0, 2, 4):
        assert "probe/replay/mean" in rows[s], (s, sorted(rows[s]))
    assert "probe/replay/mean" not in rows.get(1, {}) and "probe/replay/mean" not in rows.get(3, {})
    assert rows[0]["probe/replay/mean_rel"] == 1.0
    assert rows[0]["drift/total/rel"] == 0.0 and rows[4]["drift/total/rel"] > 0
    assert rows[4]["loss"] > 0  # the training row and the probe share one line per step

    # the step-0 probe equals a direct probe of the seeded initial model on the same samples
    from anima_ft.config import load_config
    from anima_ft.eval.eval_sets import load_shard_eval_set
    from anima_ft.eval.probe import ProbeRunner
    from anima_ft.train.trainer import build_model

    cfg = load_config(TINY, ["run.deterministic=false"])
    model = build_model(cfg)
    sets = {"replay": load_shard_eval_set(shards / "replay", name="replay", limit=4)}
    with torch.no_grad():
        direct = ProbeRunner(sets, [0.2, 0.4, 0.6, 0.8], num_noises=2, seed=0).run(model, 0)
    assert rows[0]["probe/replay/mean"] == pytest.approx(direct["probe/replay/mean"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.multiproc
def test_probe_baseline_survives_kill_and_resume(tmp_path, shards):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    rc, out = _single(_args(ref, shards))
    assert rc == 0, out[-3000:]
    rc, _ = _single(_args(killed, shards), env={"ANIMA_FT_FAULT": "kill:2:0"})
    assert rc != 0
    rc, out = _single(_args(killed, shards))
    assert rc == 0, out[-3000:]
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert b[4]["probe/replay/mean"] == a[4]["probe/replay/mean"]
    assert b[4]["probe/replay/mean_rel"] == a[4]["probe/replay/mean_rel"] != 1.0
    assert b[4]["drift/total/rel"] == a[4]["drift/total/rel"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_forgetting_budget_stops_the_run(tmp_path, shards):
    run = tmp_path / "budget"
    rc, out = _single(_args(run, shards, "num_steps=8", "optim.lr.base=0.05", "optim.lr.mlp=0.05",
                            "eval.budget_max_rise_pct=1e-9", "eval.budget_action=stop", "eval.budget_set=replay"))
    assert rc == 0, out[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert "forgetting budget was exceeded" in out
    last = max(rows)
    assert last < 8 and rows[last]["budget/replay_rise_pct"] > 1e-9


@pytest.mark.multiproc
def test_distillation_objective_replaces_the_flow_loss(tmp_path, shards):
    """Teacher = the untouched student: at step 1 (before any update) the replay distill loss is 0 up to rounding
    (the teacher runs on the replay rows only, the student on the whole micro-batch: different GEMM shapes)."""
    run = tmp_path / "distill"
    rc, out = _single(_args(run, shards, "num_steps=2", "eval.sets=[]", "eval.probe_every_steps=0",
                            "eval.drift_every_steps=0", "distill.enabled=true", "distill.adapter_source=own",
                            "logging.every_steps=1"))
    assert rc == 0, out[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[1]["loss/target"] > 0.1
    assert 0.0 <= rows[1]["loss/replay"] < 1e-10
    assert rows[2]["loss/replay"] > 0  # the student moved away from the teacher after one update


@pytest.mark.slow
@pytest.mark.multiproc
def test_sample_grids_in_training_and_skip_without_vae(tmp_path, shards, tokenizer_dir):
    """Grids from a VAE directory + a Qwen3 directory + the real tokenizers; without a VAE, one clear skip."""
    from PIL import Image

    from anima_ft.model.text_encoder import tiny_qwen3
    from anima_ft.model.vae import tiny_vae

    tiny_qwen3(seed=0).save_pretrained(tmp_path / "qwen")
    tiny_vae(seed=0).save_pretrained(tmp_path / "vae")
    grid = ["eval.grid_every_steps=2", "eval.grid_prompts=['a red fox', '']", "eval.grid_seeds=[0, 1]",
            "eval.grid_size=[32, 48]", "eval.grid_num_steps=2", "num_steps=2"]
    run = tmp_path / "grid"
    rc, out = _single(_args(run, shards, *grid, f"eval.grid_vae_path={tmp_path / 'vae'}",
                            f"eval.grid_qwen_path={tmp_path / 'qwen'}",
                            f"eval.grid_qwen_tokenizer_dir={tokenizer_dir / 'qwen3_06b'}",
                            f"eval.grid_t5_tokenizer_dir={tokenizer_dir / 't5_old'}", "logging.wandb_mode=offline"),
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert rc == 0, out[-3000:]
    # the same grids went to the (offline) wandb run as images
    assert len(list((run / "wandb").glob("offline-run-*/files/media/images/samples/grid_*.png"))) == 2
    pngs = sorted((run / "samples").glob("step_*.png"))
    assert [p.name for p in pngs] == ["step_0000000.png", "step_0000002.png"]
    a, b = (Image.open(p) for p in pngs)
    assert a.size == b.size and a.size[0] >= 2 * 48 and a.size[1] >= 2 * 32  # 2 prompts x 2 seeds of 32x48 px
    assert list(a.getdata()) != list(b.getdata())  # the model changed between step 0 and step 2

    run = tmp_path / "no_vae"
    rc, out = _single(_args(run, shards, *grid))
    assert rc == 0, out[-3000:]
    assert "eval.grid_vae_path is empty: sample grids are skipped" in out
    assert not (run / "samples").exists()
