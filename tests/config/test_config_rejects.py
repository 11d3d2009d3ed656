"""A table of bad configs: each is a ValueError from load_config/validate whose message names the dotted key."""

from __future__ import annotations

import pytest
from config_helpers import TINY

from anima_ft.config import load_config, validate
from anima_ft.config.fields import check_fields
from anima_ft.config.schema import Config

# (overrides on top of configs/tiny_cpu.yaml, the text the message must contain)
BAD_OVERRIDES = [
    (["optim.lr.mlp=.nan"], "optim.lr.mlp=nan is not a finite number"),
    (["optim.lr.base=.inf"], "optim.lr.base=inf"),
    (["optim.grad_clip=.nan"], "optim.grad_clip=nan"),
    (["optim.grad_clip=-1.0"], "optim.grad_clip=-1.0 is out of range"),
    (["optim.eps=-1.0e-8"], "optim.eps=-1e-08 is out of range: must be > 0"),
    (["optim.eps=0"], "optim.eps=0.0 is out of range"),
    (["optim.weight_decay=-.inf"], "optim.weight_decay=-inf"),
    (["optim.betas=[0.9, .nan]"], "optim.betas.1=nan"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas.1=1.0 is out of range: must be in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers"),
    (["ema.decay=1.0"], "ema.decay=1.0 is out of range"),
    (["objective.shift=0"], "objective.shift=0.0"),
    (["objective.sigmoid_scale=.nan"], "objective.sigmoid_scale=nan"),
    (["dist.activation_checkpointing=1.5"], "dist.activation_checkpointing=1.5"),
    (["dist.zero_stage=4"], "dist.zero_stage=4"),
    (["dist.timeout_s=0"], "dist.timeout_s=0"),
    (["checkpoint.every_minutes=.nan"], "checkpoint.every_minutes=nan"),
    (["logging.peak_tflops_per_device=0"], "logging.peak_tflops_per_device=0.0"),
    (["eval.sigmas=[0.5, 1.5]"], "eval.sigmas.1=1.5"),
    (["eval.budget_max_rise_pct=.inf"], "eval.budget_max_rise_pct=inf"),
    (["eval.budget_max_rise_pct=5"], "eval.budget_max_rise_pct=5.0 watches eval.budget_set='replay'"),
    (["eval.grid_every_steps=5", "eval.grid_prompts=[a]", "eval.grid_size=[64, 72]"], "eval.grid_size.1=72"),
    (["eval.grid_guidance_scale=.nan"], "eval.grid_guidance_scale=nan"),
    (["run.dir="], "run.dir='' is empty"),
    (["run.dir='  '"], "run.dir='  ' is empty"),
    (["run.seed=-1"], "run.seed=-1 is out of range"),
    (["run.seed=4294967296"], "run.seed=4294967296 is out of range"),
    (["data.synthetic_latent_size=0"], "data.synthetic_latent_size=0 is out of range"),
    (["data.synthetic_latent_size=7"], "data.synthetic_latent_size=7 must be even"),
    (["data.synthetic_num_samples=0"], "data.synthetic_num_samples=0"),
    (["data.synthetic_num_tokens=0"], "data.synthetic_num_tokens=0"),
    (["data.caption_dropout=.nan"], "data.caption_dropout=nan"),
    (["data.remote.requests_in_flight=-1"], "data.remote.requests_in_flight=-1 is out of range"),
    (["data.remote.prefetch_samples=8", "data.remote.requests_in_flight=9"],
     "data.remote.requests_in_flight=9 is above data.remote.prefetch_samples=8"),
    (["data.remote.cache_max_gb=5"], "data.remote.cache_max_gb=5.0 is set but data.remote.cache_dir is empty"),
    (["data.sources=[{name: target, shards: ['/nonexistent/*.tar']}]"],
     "data.sources.0.shards.0='/nonexistent/*.tar' matches nothing on disk"),
    (["data.sources=[{name: target, shards: ['']}]"], "data.sources.0.shards.0='' is empty"),
    (["data.sources=[{name: target, shards: []}]"], "data.sources.0.shards is empty"),
    (["model.init_path=/nonexistent.safetensors"], "model.init_path='/nonexistent.safetensors' does not exist"),
    (["model.attention_backend=flash"], "model.attention_backend='flash' is not valid"),
    (["model.size=huge"], "model.size='huge'"),
    (["checkpoint.resume=/no/such/dir"], "checkpoint.resume"),
    (["logging.wandb_mode=yes"], "logging.wandb_mode='True' is not valid"),  # YAML reads yes as true
    (["logging.wandb_mode=onlin"], "logging.wandb_mode='onlin' is not valid"),
    (["dist.deepspeed_overrides.train_batch_size=7"], "dist.deepspeed_overrides.train_batch_size=7 contradicts"),
    (["dist.deepspeed_overrides.gradient_accumulation_steps=3"],
     "dist.deepspeed_overrides.gradient_accumulation_steps=3 contradicts the config, which gives 1"),
    (["dist.deepspeed_overrides.train_micro_batch_size_per_gpu=1"], "train_micro_batch_size_per_gpu=1 contradicts"),
    (["dist.deepspeed_overrides.zero_optimization.stage=3"], "dist.deepspeed_overrides.zero_optimization.stage=3"),
    (["dist.deepspeed_overrides.bf16={enabled: true}"], "dist.deepspeed_overrides.bf16.enabled=True contradicts"),
    (["dist.deepspeed_overrides.zero_optimization=3"], "dist.deepspeed_overrides.zero_optimization=3 replaces"),
    (["dist.deepspeed_overrides.flops_profiler.top=.nan"], "dist.deepspeed_overrides.flops_profiler.top=nan"),
    (["distill.context_noise_std=.nan"], "distill.context_noise_std=nan"),
    (["optim.lr.mlp=[1,"], "override optim.lr.mlp: YAML syntax error"),
    (["optim.lr.mlp={a: 1}"], "override optim.lr.mlp="),
    (["batch.micro_batch_size=1.5"], "override batch.micro_batch_size=1.5"),
    (["stages.3.num_steps=2"], "stages"),
]


@pytest.mark.parametrize("overrides,needle", BAD_OVERRIDES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_override_is_value_error_naming_the_key(overrides, needle):
    with pytest.raises(ValueError) as exc:
        validate(load_config(TINY, overrides), world_size=1)
    assert needle in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)  # launch/train.py logs it as one line


def test_consistent_deepspeed_overrides_are_accepted():
    cfg = load_config(TINY, ["dist.deepspeed_overrides.train_batch_size=4", "dist.deepspeed_overrides.bf16.enabled=false",
                             "dist.deepspeed_overrides.zero_optimization.reduce_bucket_size=1000"])
    validate(cfg, world_size=2)  # 2 x 1 x 2 = 4, fp32 recipe
    with pytest.raises(ValueError, match="train_batch_size=4 contradicts the config, which gives 8"):
        validate(cfg, world_size=4)


YAML_FILES = [
    ("optim:\n  lr: {mlp: 1e-5\n", "YAML syntax error at line"),
    ("optim:\n\tlr: 1\n", "YAML syntax error"),
    ("run: {dir: a: b}\n", "YAML syntax error"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("optim: 3\n", "optim must be a mapping"),
    ("optim:\n  lr:\n    mlp: .nan\n", "optim.lr.mlp=nan"),
    ("stages:\n  - {num_steps: 4, lr: {mlp: .nan}}\n", "stages.0.lr.mlp=nan"),
    ("stages:\n  - {num_steps: 4, warmup_steps: 5}\n", "stages.0.warmup_steps=5 must be <= stages.0.num_steps=4"),
    ("stages:\n  - {num_steps: 0}\n", "stages.0.num_steps=0"),
    ("stages:\n  - {num_steps: 4, replay_fraction: 2.0}\n", "stages.0.replay_fraction=2.0"),
    ("stages: {num_steps: 4}\n", "stages must be a list, got dict"),
    ("batch:\n  micro_batch_size: [1, 2]\n", "batch.micro_batch_size"),
]


@pytest.mark.parametrize("text,needle", YAML_FILES)
def test_bad_yaml_file_is_value_error(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        validate(load_config(path), world_size=1)
    assert needle in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


def test_non_utf8_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"run:\n  dir: \xff\xfe\n")
    with pytest.raises(ValueError, match="give a UTF-8 YAML file"):
        load_config(path)


def test_eval_set_path_must_match_shards(shard_dir):
    ok = [f"eval.sets=[{{name: replay, path: '{shard_dir}'}}]", "eval.probe_every_steps=5"]
    validate(load_config(TINY, ok), 1)
    with pytest.raises(ValueError, match="eval.sets.0.path='/no/eval' matches nothing on disk"):
        validate(load_config(TINY, ["eval.sets=[{name: replay, path: /no/eval}]", "eval.probe_every_steps=5"]), 1)


def test_paths_are_not_checked_without_check_files():
    cfg = load_config(TINY, ["model.init_path=/no/model.safetensors", "data.sources=[{name: target, shards: [/no/x]}]"])
    validate(cfg, world_size=1, check_files=False)
    with pytest.raises(ValueError, match="model.init_path='/no/model.safetensors' does not exist"):
        validate(cfg, world_size=1)


def test_defaults_pass_the_field_walk():
    check_fields(Config(), "")
