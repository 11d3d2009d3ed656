"""Resuming a checkpoint on another world size (ZeRO-1/2/3 on 1, 2 and 3 CPU ranks).

Each case trains a reference run over real shards (MixedStream) for 6 steps with a checkpoint at step 4, then resumes
that checkpoint on another world size:
- a load-only run (stopped at step 4, saved again) must hold bitwise the saved fp32 weights (frozen ones included),
  Adam moments, EMA, per-group AdamW step counts and param-group settings;
- with the same global batch (grad_accum_steps x world size = 2), the continued run must see exactly the
  reference's sample keys for steps 5-6 (global micro-batch order) and follow its losses to LOSS_RTOL (gradients
  are summed in another order: all-reduce over ranks vs. accumulation) and its step-6 weights to WEIGHT_ATOL.
The recipe makes the checkpoint hard to reshard: stage 1 freezes ``mod`` (so at step 4 ``mod`` has 1 AdamW step and
the rest 4), stage 2 freezes the adapter after it trained (frozen values that differ from the init), weight decay
differs between param groups, and an EMA is kept. 2 -> 3 ranks under ZeRO-3 leaves parameters whose size is not a
multiple of the world size (padded partitions).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from anima_ft.model import AnimaConfig, build_anima
from anima_ft.observability import read_metrics
from anima_ft.train.export import fp32_state_dict, state_view
from tests.distributed.conftest import REPO, TRAIN, launch, run_env
from tests.integration.test_train_runs import _write_shards

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
RECIPE = """
run: {seed: 0, deterministic: true}
model: {size: tiny}
data:
  num_workers: 0
  sources:
    - {name: target, shards: ['ROOT/target/*.tar'], weight: 0.75}
    - {name: replay, shards: ['ROOT/replay/*.tar'], weight: 0.25}
batch: {micro_batch_size: 2}
optim:
  lr: {base: 1.0e-3, self_attn: 1.0e-3, cross_attn: 1.0e-3, mlp: 1.0e-3, mod: 1.0e-3, llm_adapter: 1.0e-3}
  weight_decay: 0.1
stages:
  - {name: no_mod, num_steps: 3, lr: {mod: 0}}
  - {name: no_adapter, num_steps: 3, lr: {llm_adapter: 0}}
ema: {decay: 0.5}
dist: {precision: fp32, backend: gloo, timeout_s: 60}
checkpoint: {every_steps: 2, keep_last: 0}
logging: {progress_bar: false}
"""
RESUME_AT, TOTAL = 4, 6

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reshard_data")
    _write_shards(root / "target", "target", 24)
    _write_shards(root / "replay", "replay", 24)
    path = root / "recipe.yaml"
    path.write_text(RECIPE.replace("ROOT", str(root)))
    return path


def _run(world: int, args: list[str], trace: Path | None = None) -> str:
    """``launch/train.py`` on ``world`` CPU ranks (deepspeed launcher, or a plain process for one) with a global
    batch of 4 where the world size allows (``grad_accum_steps = 2 / world``, else 1); returns the output."""
    args = [*args, f"batch.grad_accum_steps={max(1, 2 // world)}"]
    env = {"ANIMA_FT_TRACE_KEYS": str(trace)} if trace else {}
    if trace:
        trace.mkdir()
    if world > 1:
        rc, out, _ = launch(args, nproc=world, env=env)
    else:
        proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=run_env(env), capture_output=True,
                              text=True, timeout=240)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    assert rc == 0, out[-4000:]
    return out


def _keys(trace: Path, steps: range) -> list[str]:
    """The sample keys of ``steps`` in global order (step, then micro-batch index j)."""
    rows = [json.loads(line) for f in sorted(trace.glob("rank_*.jsonl")) for line in f.read_text().splitlines()]
    rows = sorted((r for r in rows if r["step"] in steps), key=lambda r: (r["step"], r["index"]))
    return [k for r in rows for k in r["keys"]]


def _states(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full fp32 weights and each optimizer-state entry, read with DeepSpeed's zero_to_fp32 (not the converter)."""
    out = {"fp32": fp32_state_dict(ckpt)}
    for key in ("exp_avg", "exp_avg_sq", "ema"):
        with tempfile.TemporaryDirectory() as tmp:
            out[key] = fp32_state_dict(state_view(ckpt, Path(tmp), key))
    return out


def _param_groups(ckpt: Path) -> list[dict]:
    """Rank 0's saved optimizer param groups without ``params`` / ``lr`` (the trainer sets LRs every step)."""
    osd = torch.load(next(ckpt.glob("*rank_0_*optim_states.pt")), map_location="cpu", weights_only=False)
    osd = osd["optimizer_state_dict"]
    base = osd["optimizer_state_dict"] if "fp32_flat_groups" in osd else osd["base_optimizer_state"]
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in base["param_groups"]]


@pytest.mark.parametrize("zero,before,after", [(2, 2, 1), (2, 1, 2), (3, 2, 1), (1, 2, 1), (3, 2, 3)],
                         ids=["zero2_2to1", "zero2_1to2", "zero3_2to1", "zero1_2to1", "zero3_2to3"])
def test_resume_on_another_world_size(tmp_path, recipe, zero, before, after):
    common = ["--config", str(recipe), f"dist.zero_stage={zero}"]
    if zero == 3:  # partition every parameter (the default keeps tensors under 100k elements whole)
        common.append("dist.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
    ref, loaded, cont = tmp_path / "ref", tmp_path / "loaded", tmp_path / "cont"
    _run(before, [*common, f"run.dir={ref}"], trace=tmp_path / "trace_ref")
    saved = ref / "checkpoints" / f"step_{RESUME_AT:08d}"
    resume = f"checkpoint.resume={saved}"

    if (zero, before) == (2, 2):  # the knob refuses, before any conversion
        proc = subprocess.run([sys.executable, str(TRAIN), *common, f"run.dir={tmp_path / 'refused'}", resume,
                               "checkpoint.allow_world_size_change=false", "batch.grad_accum_steps=2"], cwd=REPO,
                              env=run_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode != 0
        assert "was saved by 2 ranks and this run has 1" in proc.stdout + proc.stderr
        assert not (saved / "universal").exists()

    # 1. load only: stop at the checkpoint's step and save it again from the new world size
    out = _run(after, [*common, f"run.dir={loaded}", resume, "stages.1.num_steps=1", "checkpoint.every_steps=0"])
    assert f"it was saved by {before} ranks" in out and "converting" in out
    assert "RNGs were reseeded from (run.seed, step 4, rank)" in out
    same_batch = 2 % after == 0
    assert ("continue exactly as in an uninterrupted run" if same_batch else "global batch size 4 -> 6") in out
    model_states = (["mp_rank_00_model_states.pt"] if zero < 3 else
                    [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(before)])
    assert {p.name for p in (saved / "universal").iterdir()} == {"anima_ft.json", "zero", *model_states}
    assert not (saved / "latest_universal").exists() and not list(saved.parent.glob("*ema_view*"))
    again = loaded / "checkpoints" / f"step_{RESUME_AT:08d}"
    want, got = _states(saved), _states(again)
    init = build_anima(AnimaConfig.tiny(), seed=0).state_dict()
    adapter = [n for n in init if n.startswith("llm_adapter.")]
    assert all(not torch.equal(want["fp32"][n], init[n]) for n in adapter)  # frozen now, but trained in stage 1
    for key, tensors in want.items():
        assert sorted(got[key]) == sorted(tensors) == sorted(init)
        for name, value in tensors.items():
            assert torch.equal(got[key][name], value), (key, name)
    trainer_json = [json.loads((c / "trainer.json").read_text()) for c in (saved, again)]
    steps = trainer_json[0]["optimizer_steps"]
    assert steps["mod/decay"] == 1.0 and steps["mlp/decay"] == 4.0 and "llm_adapter/decay" not in steps
    assert trainer_json[1]["optimizer_steps"] == steps
    assert [t["world_size"] for t in trainer_json] == [before, after]
    assert _param_groups(again) == _param_groups(saved)  # weight decay 0.1 / 0.0 and our group names per group

    if not same_batch:
        return
    # 2. continue to the end on the new world size (reusing the converted checkpoint)
    out = _run(after, [*common, f"run.dir={cont}", resume], trace=tmp_path / "trace_cont")
    assert "reusing the universal checkpoint" in out
    steps_after = range(RESUME_AT + 1, TOTAL + 1)
    want_keys = _keys(tmp_path / "trace_ref", steps_after)
    assert len(want_keys) == 2 * 2 * len(steps_after)
    assert _keys(tmp_path / "trace_cont", steps_after) == want_keys
    ref_m, cont_m = read_metrics(ref / "metrics.jsonl"), read_metrics(cont / "metrics.jsonl")
    assert sorted(cont_m) == list(steps_after)
    for s in steps_after:
        assert cont_m[s]["loss"] == pytest.approx(ref_m[s]["loss"], rel=LOSS_RTOL, abs=0), s
        assert cont_m[s]["samples_seen"] == ref_m[s]["samples_seen"]
    final = [fp32_state_dict(run / "checkpoints" / f"step_{TOTAL:08d}") for run in (ref, cont)]
    for name, value in final[0].items():
        torch.testing.assert_close(final[1][name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
