"""Config loader, validation and DeepSpeed JSON generation."""

from __future__ import annotations

from pathlib import Path

import pytest

from anima_ft.config import build_deepspeed_config, effective_lrs, load_config, to_yaml, validate

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr:\n    mlp: 3.0e-5\n  weight_decay: 0.1\n")
    cfg = load_config(y, ["optim.weight_decay=0.2"])
    assert cfg.optim.lr.mlp == 3e-5  # YAML over default
    assert cfg.optim.weight_decay == 0.2  # CLI over YAML
    assert cfg.optim.lr.base == 1e-5  # default kept


@pytest.mark.parametrize(
    "text,override,needle",
    [
        ("optim:\n  weight_decy: 0.1\n", None, "did you mean 'optim.weight_decay'"),
        ("stages:\n  - {num_steps: 3, lrr: {}}\n", None, "'stages.0.lrr'"),
        ("", "optim.lr.mpl=1", "did you mean 'optim.lr.mlp'"),
        ("", "dist.zero_stag=3", "did you mean 'dist.zero_stage'"),
    ],
)
def test_unknown_key_names_closest(tmp_path, text, override, needle):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ValueError, match="unknown key") as exc:
        load_config(y, [override] if override else [])
    assert needle in str(exc.value)


def test_wrong_type_is_value_error():
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(None, ["dist.zero_stage=two"])


def test_stage_override_by_index_and_inherit(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stages:\n  - {num_steps: 5, lr: {llm_adapter: 0}}\n  - {num_steps: 5}\n")
    cfg = load_config(y, ["stages.1.lr.llm_adapter=2e-6"])
    lrs = effective_lrs(cfg)
    assert lrs[0]["llm_adapter"] == 0.0 and lrs[0]["mlp"] == cfg.optim.lr.mlp
    assert lrs[1]["llm_adapter"] == 2e-6


def test_batch_arithmetic_checked_against_world_size():
    cfg = load_config(None, ["batch.micro_batch_size=2", "batch.grad_accum_steps=4", "batch.global_batch_size=64"])
    validate(cfg, world_size=8)
    with pytest.raises(ValueError, match="global_batch_size=64") as exc:
        validate(cfg, world_size=4)
    assert "grad_accum_steps=8" in str(exc.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("dist.zero_stage=4", "dist.zero_stage"),
        ("dist.activation_checkpointing=1.5", "activation_checkpointing"),
        ("optim.lr.mlp=-1", "optim.lr.mlp"),
        ("logging.wandb_mode=yes", "wandb_mode"),
        ("model.init_path=/nonexistent.safetensors", "model.init_path"),
        ("checkpoint.resume=/no/such/dir", "checkpoint.resume"),
    ],
)
def test_validate_rejects(override, needle):
    with pytest.raises(ValueError, match=needle):
        validate(load_config(None, [override]), world_size=1)


def test_all_frozen_stage_rejected(tmp_path):
    lrs = "{base: 0, self_attn: 0, cross_attn: 0, mlp: 0, mod: 0, llm_adapter: 0}"
    y = tmp_path / "c.yaml"
    y.write_text(f"stages:\n  - {{num_steps: 2, lr: {lrs}}}\n")
    with pytest.raises(ValueError, match="freezes every parameter group"):
        validate(load_config(y), world_size=1)


def test_deepspeed_json_from_config():
    cfg = load_config(
        None,
        [
            "batch.micro_batch_size=3",
            "batch.grad_accum_steps=2",
            "dist.zero_stage=3",
            "dist.offload_optimizer=true",
            "optim.grad_clip=0.5",
            "dist.deepspeed_overrides.zero_optimization.reduce_bucket_size=123",
            "dist.deepspeed_overrides.flops_profiler={enabled: true}",
        ],
    )
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == 123 and z["contiguous_gradients"] is True  # merged, not replaced
    assert ds["flops_profiler"] == {"enabled": True}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_load_and_validate(recipe):
    cfg = load_config(recipe)
    for world in (1, 2, 8, 16):
        try:
            validate(cfg, world_size=world, check_files=False)  # weights and shards are not in the repository
        except ValueError as exc:
            if "global_batch_size" not in str(exc):
                raise
    assert "run:" in to_yaml(cfg)


def test_zero_buckets_are_capped_at_the_model_size():
    cfg = load_config(None, [])
    assert build_deepspeed_config(cfg, 1)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    z = build_deepspeed_config(cfg, 1, num_params=1_238_144)["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 1_238_144


def test_wandb_mode_without_wandb_fails_before_work(monkeypatch):
    import importlib.util

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["logging.wandb_mode=offline"])
    validate(cfg, 1)  # installed in the dev environment
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="logging.wandb_mode=offline needs the wandb package"):
        validate(cfg, 1)
    validate(load_config(REPO / "configs" / "tiny_cpu.yaml", ["logging.wandb_mode=disabled"]), 1)
