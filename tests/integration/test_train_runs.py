"""Named end-to-end runs of launch/train.py on CPU: config errors, non-finite losses, preemption, stage-state carry,
and the Slurm multi-node path simulated on localhost. Every run has a subprocess timeout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from anima_ft.observability import read_metrics
from tests.distributed.conftest import REPO, TRAIN, free_port, launch, run_env

TINY = str(REPO / "configs" / "tiny_cpu.yaml")
SHORT = ["num_steps=6", "checkpoint.every_steps=2"]


def _single(args: list[str], env: dict | None = None, timeout: float = 180):
    """A world of one: plain ``python launch/train.py``."""
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=run_env(env), capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_bad_config_fails_before_any_work(tmp_path):
    t0 = time.monotonic()
    rc, out = _single(["--config", TINY, f"run.dir={tmp_path / 'run'}", "optim.weight_decy=0.1"])
    assert rc == 2, out[-2000:]
    assert "unknown key 'optim.weight_decy'" in out and "did you mean 'optim.weight_decay'" in out
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
@pytest.mark.multiproc
def test_bad_batch_arithmetic_fails_on_every_rank_before_work(tmp_path):
    rc, out, seconds = launch(["--config", TINY, f"run.dir={tmp_path / 'run'}", "batch.global_batch_size=6"],
                              timeout=120)
    assert rc == 2, out[-2000:]
    assert out.count("bad config: batch.global_batch_size=6") == 2  # both ranks, each before init_distributed
    assert "trainable elements" not in out  # no model or engine was built
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nonfinite_loss_skips_then_stops(tmp_path):
    run = tmp_path / "skip"
    rc, out = _single(["--config", TINY, f"run.dir={run}", *SHORT], env={"ANIMA_FT_FAULT": "nan:2"})
    assert rc == 0, out[-3000:]
    m = read_metrics(run / "metrics.jsonl")
    assert m[3]["nonfinite_total"] == 1 and m[3]["loss"] != m[3]["loss"]  # NaN logged, step counted
    assert all(m[s]["loss"] == m[s]["loss"] for s in (4, 5, 6))  # weights were not poisoned
    assert m[6]["nonfinite_total"] == 1

    run = tmp_path / "stop"
    rc, out = _single(["--config", TINY, f"run.dir={run}", *SHORT, "optim.max_nonfinite_in_row=2"],
                      env={"ANIMA_FT_FAULT": "nan:1-99"})
    assert rc != 0
    assert "2 non-finite losses in a row at step 3" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"


@pytest.fixture(scope="module")
def reference_2rank(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref2")
    rc, out, _ = launch(["--config", TINY, f"run.dir={run}", *SHORT])
    assert rc == 0, out[-3000:]
    return read_metrics(run / "metrics.jsonl")


def _assert_same_losses(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])


@pytest.mark.slow
@pytest.mark.multiproc
def test_preemption_signal_saves_requeue_exit_and_resumes(tmp_path, reference_2rank):
    run = tmp_path / "pre"
    args = ["--config", TINY, f"run.dir={run}", *SHORT]
    rc, out, _ = launch(args, env={"ANIMA_FT_FAULT": "signal:2:1"})  # SIGUSR1 to rank 1 during step 3
    assert rc == 75, out[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    rc, out, _ = launch(args)
    assert rc == 0, out[-3000:]
    _assert_same_losses(read_metrics(run / "metrics.jsonl"), reference_2rank)


@pytest.mark.slow
@pytest.mark.multiproc
def test_multinode_slurm_path_simulated_on_localhost(tmp_path, reference_2rank):
    """Two "nodes" of one CPU rank each, started through launch/slurm/run_task.sh with a Slurm-like environment."""
    run = tmp_path / "mn"
    port = str(free_port())
    procs = []
    for node in range(2):
        env = run_env({"SLURM_PROCID": str(node), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": str(node),
                       "SLURM_JOB_NUM_NODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(["bash", str(REPO / "launch/slurm/run_task.sh"), "--config", TINY,
                                       f"run.dir={run}", *SHORT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    _assert_same_losses(read_metrics(run / "metrics.jsonl"), reference_2rank)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("zero", [2, 3])
def test_stage_rebuild_carries_optimizer_state_exactly(tmp_path, zero):
    """Two stages with the same trainable set (engine rebuilt at the boundary) == one stage, bitwise."""
    staged = tmp_path / "staged.yaml"
    staged.write_text((REPO / "configs" / "tiny_cpu.yaml").read_text() + (
        "stages:\n  - {num_steps: 3, lr: {llm_adapter: 0}}\n  - {num_steps: 3, lr: {llm_adapter: 0}}\n"))
    common = [f"dist.zero_stage={zero}", "optim.weight_decay=0.1", "checkpoint.every_steps=0"]
    rc, out, _ = launch(["--config", str(staged), f"run.dir={tmp_path / 'a'}", *common])
    assert rc == 0, out[-3000:]
    assert "kept state of ['base', 'cross_attn', 'mlp', 'mod', 'self_attn']" in out
    rc, out, _ = launch(["--config", TINY, f"run.dir={tmp_path / 'b'}", "num_steps=6", "optim.lr.llm_adapter=0",
                         *common])
    assert rc == 0, out[-3000:]
    _assert_same_losses(read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl"))


def _write_shards(out_dir, name: str, n: int) -> None:
    """Tiny pre-encoded shards in the real format (qwen width 32 = the tiny adapter's source_dim)."""
    import torch

    from anima_ft.data import EncodedSample, ShardWriter, make_fingerprint

    g = torch.Generator().manual_seed(len(name))
    out_dir.mkdir(parents=True)
    with ShardWriter(out_dir / f"{name}-0000.tar", make_fingerprint({"vae": "t"}, {"text": "t"})) as writer:
        for i in range(n):
            bucket = (64, 64) if i % 2 else (64, 48)  # (W, H) pixels -> latents [16, H/8, W/8]
            latent = torch.randn(16, bucket[1] // 8, bucket[0] // 8, generator=g).to(torch.bfloat16)
            qwen = torch.randn(3 + i % 4, 32, generator=g).to(torch.bfloat16)
            t5 = torch.randint(2, 32000, (2 + i % 3,), generator=g, dtype=torch.int32)
            meta = {"caption": f"{name} {i}", "source": name, "bucket": list(bucket)}
            writer.add(EncodedSample(f"{name}_{i:04d}", latent, qwen, t5, meta))
        writer.commit()


@pytest.mark.slow
@pytest.mark.multiproc
def test_real_shards_replay_stage_and_resume(tmp_path):
    """MixedStream over real shards: stage 2 raises the replay share; a kill -9 mid-run resumes bitwise."""
    _write_shards(tmp_path / "target", "target", 24)
    _write_shards(tmp_path / "replay", "replay", 24)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text((REPO / "configs" / "tiny_cpu.yaml").read_text() + """
stages:
  - {name: target_only, num_steps: 3, lr: {llm_adapter: 0}, replay_fraction: 0.0}
  - {name: with_replay, num_steps: 3, replay_fraction: 0.5}
""")
    sources = [f"data.sources=[{{name: target, shards: ['{tmp_path}/target/*.tar']}}, "
               f"{{name: replay, shards: ['{tmp_path}/replay/*.tar']}}]", "checkpoint.every_steps=1"]
    runs = {k: tmp_path / k for k in ("ref", "killed")}
    rc, out, _ = launch(["--config", str(recipe), f"run.dir={runs['ref']}", *sources])
    assert rc == 0, out[-4000:]
    ref = read_metrics(runs["ref"] / "metrics.jsonl")
    for s in (1, 2, 3):
        assert "loss/replay" not in ref[s] and "loss/target" in ref[s]
    for s in (4, 5, 6):
        assert "loss/replay" in ref[s] and "loss/target" in ref[s]
        assert ref[s]["loss"] == pytest.approx((ref[s]["loss/replay"] + ref[s]["loss/target"]) / 2, rel=1e-9)
    # the loader's counters reach metrics.jsonl: no skips in clean shards, no remote requests for local ones
    assert not [k for k in ref[6] if k.startswith("data/skipped/")] and ref[6]["data/io_requests"] == 0
    args = ["--config", str(recipe), f"run.dir={runs['killed']}", *sources]
    rc, out, _ = launch(args, env={"ANIMA_FT_FAULT": "kill:4:0"})
    assert rc != 0
    rc, out, _ = launch(args)
    assert rc == 0, out[-4000:]
    _assert_same_losses(read_metrics(runs["killed"] / "metrics.jsonl"), ref)


@pytest.mark.slow
@pytest.mark.multiproc
def test_activation_checkpointing_keeps_the_losses(tmp_path, reference_2rank):
    """Recomputing every block in backward changes memory, not the math (per-step losses within 1e-6)."""
    run = tmp_path / "ac"
    rc, out, _ = launch(["--config", TINY, f"run.dir={run}", *SHORT, "dist.activation_checkpointing=1.0"])
    assert rc == 0, out[-3000:]
    got = read_metrics(run / "metrics.jsonl")
    assert sorted(got) == sorted(reference_2rank)
    for s, row in reference_2rank.items():
        assert got[s]["loss"] == pytest.approx(row["loss"], rel=1e-6, abs=0), s


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_launch_matches_deepspeed_launch(tmp_path, reference_2rank):
    run = tmp_path / "tr"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(TRAIN), "--config", TINY,
           f"run.dir={run}", *SHORT]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _assert_same_losses(read_metrics(run / "metrics.jsonl"), reference_2rank)
    # every 2 steps, keep_last 2 (tiny_cpu.yaml): only the two newest complete checkpoints remain
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"


@pytest.mark.slow
def test_timed_checkpoints_single_process(tmp_path):
    """``checkpoint.every_minutes`` (rank 0 decides, every rank agrees through the step's all-reduce)."""
    run = tmp_path / "timed"
    rc, out = _single(["--config", TINY, f"run.dir={run}", "num_steps=3", "checkpoint.every_steps=0",
                       "checkpoint.every_minutes=1e-6", "checkpoint.keep_last=0", "checkpoint.save_at_end=false"])
    assert rc == 0, out[-3000:]
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_00000001", "step_00000002", "step_00000003"]
