"""Cross-field checks, run before any heavy work (model build, process-group collectives)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .schema import PARAM_GROUPS, Config

ZERO_STAGES = (1, 2, 3)
PRECISIONS = ("bf16", "fp32")
BACKENDS = ("auto", "nccl", "gloo")
DECAYS = ("constant", "cosine", "linear")
SAMPLERS = ("logit_normal", "uniform")
WANDB_MODES = ("online", "offline", "disabled")
SIZES = ("full", "tiny")
ATTENTION = ("sdpa", "reference", "triton")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; use one of {list(allowed)}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def effective_lrs(cfg: Config) -> list[dict[str, float]]:
    """Peak LR per group for every stage (the single implicit stage when ``stages`` is empty), -1 resolved."""
    base = {g: float(getattr(cfg.optim.lr, g)) for g in PARAM_GROUPS}
    if not cfg.stages:
        return [base]
    out = []
    for st in cfg.stages:
        lrs = {}
        for g in PARAM_GROUPS:
            v = float(getattr(st.lr, g))
            lrs[g] = base[g] if v == -1.0 else v
        out.append(lrs)
    return out


def global_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over all ranks."""
    return cfg.batch.micro_batch_size * cfg.batch.grad_accum_steps * world_size


def validate(cfg: Config, world_size: int) -> None:
    """Raise ValueError naming the first inconsistent field and how to fix it."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    b = cfg.batch
    _positive("batch.micro_batch_size", b.micro_batch_size)
    _positive("batch.grad_accum_steps", b.grad_accum_steps)
    if b.global_batch_size:
        want = b.micro_batch_size * b.grad_accum_steps * world_size
        if b.global_batch_size != want:
            fix = b.global_batch_size / (b.micro_batch_size * world_size)
            raise ValueError(
                f"batch.global_batch_size={b.global_batch_size} != micro_batch_size {b.micro_batch_size} x "
                f"grad_accum_steps {b.grad_accum_steps} x world size {world_size} = {want}; set "
                f"batch.grad_accum_steps={fix:g} (if whole) or batch.global_batch_size=0 to derive it"
            )
    _one_of("model.size", cfg.model.size, SIZES)
    _one_of("model.attention_backend", cfg.model.attention_backend, ATTENTION)
    for key in ("init_path", "adapter_path"):
        p = getattr(cfg.model, key)
        if p and not Path(p).is_file():
            raise ValueError(f"model.{key}={p!r} does not exist; give the official Anima safetensors path")
    if cfg.model.adapter_path and not cfg.model.init_path:
        raise ValueError("model.adapter_path needs model.init_path (the DiT file it completes)")

    d = cfg.dist
    _one_of("dist.zero_stage", d.zero_stage, ZERO_STAGES)
    _one_of("dist.precision", d.precision, PRECISIONS)
    _one_of("dist.backend", d.backend, BACKENDS)
    if not 0.0 <= d.activation_checkpointing <= 1.0:
        raise ValueError(f"dist.activation_checkpointing={d.activation_checkpointing} must be a share in [0, 1]")
    _positive("dist.timeout_s", d.timeout_s)

    o = cfg.optim
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.max_nonfinite_in_row", o.max_nonfinite_in_row)
    if o.grad_clip == 0 and d.precision == "fp32":
        raise ValueError("optim.grad_clip=0 with dist.precision=fp32 turns off DeepSpeed's non-finite gradient check "
                         "(steps with NaN/inf would be applied); set optim.grad_clip > 0 or use bf16")
    if len(o.betas) != 2 or not all(0.0 <= x < 1.0 for x in o.betas):
        raise ValueError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    for g in PARAM_GROUPS:
        v = getattr(o.lr, g)
        if v < 0:
            raise ValueError(f"optim.lr.{g}={v} must be >= 0 (0 freezes the group)")

    if not cfg.stages:
        _positive("num_steps", cfg.num_steps)
    names = {s.name for s in cfg.data.sources}
    for i, st in enumerate(cfg.stages):
        where = f"stages.{i}"
        _positive(f"{where}.num_steps", st.num_steps)
        _one_of(f"{where}.decay", st.decay, DECAYS)
        if not 0 <= st.warmup_steps <= st.num_steps:
            raise ValueError(f"{where}.warmup_steps={st.warmup_steps} must be in [0, num_steps={st.num_steps}]")
        if not 0.0 <= st.min_lr_ratio <= 1.0:
            raise ValueError(f"{where}.min_lr_ratio={st.min_lr_ratio} must be in [0, 1]")
        for g in PARAM_GROUPS:
            v = getattr(st.lr, g)
            if v < 0 and v != -1.0:
                raise ValueError(f"{where}.lr.{g}={v} must be >= 0, or -1 to inherit optim.lr.{g}")
        rf = st.replay_fraction
        if rf != -1.0:
            if not 0.0 <= rf <= 1.0:
                raise ValueError(f"{where}.replay_fraction={rf} must be in [0, 1] or -1 (keep source weights)")
            if cfg.data.sources and not {"target", "replay"} <= names:
                raise ValueError(
                    f"{where}.replay_fraction={rf} needs data sources named 'target' and 'replay'; have {sorted(names)}"
                )
    for i, lrs in enumerate(effective_lrs(cfg)):
        if not any(v > 0 for v in lrs.values()):
            raise ValueError(f"stage {i} freezes every parameter group (all learning rates are 0); nothing to train")

    if len(names) != len(cfg.data.sources):
        raise ValueError(f"data.sources names must be unique, got {[s.name for s in cfg.data.sources]}")
    for i, s in enumerate(cfg.data.sources):
        if not s.shards:
            raise ValueError(f"data.sources.{i} ({s.name!r}) lists no shards; give paths or globs")
        _positive(f"data.sources.{i}.weight", s.weight, allow_zero=True)
    if not 0.0 <= cfg.data.caption_dropout <= 1.0:
        raise ValueError(f"data.caption_dropout={cfg.data.caption_dropout} must be in [0, 1]")
    _positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    if not cfg.data.sources:
        _positive("data.synthetic_num_samples", cfg.data.synthetic_num_samples)
        if cfg.data.synthetic_latent_size % 2:
            raise ValueError(f"data.synthetic_latent_size={cfg.data.synthetic_latent_size} must be even (patch 2)")

    ob = cfg.objective
    _one_of("objective.timestep_sampling", ob.timestep_sampling, SAMPLERS)
    _positive("objective.sigmoid_scale", ob.sigmoid_scale)
    _positive("objective.shift", ob.shift)

    c = cfg.checkpoint
    _positive("checkpoint.every_steps", c.every_steps, allow_zero=True)
    _positive("checkpoint.every_minutes", c.every_minutes, allow_zero=True)
    _positive("checkpoint.keep_last", c.keep_last, allow_zero=True)
    if c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ValueError(f"checkpoint.resume={c.resume!r}: use 'auto', 'none' or an existing checkpoint directory")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ValueError(f"ema.decay={cfg.ema.decay} must be in [0, 1) (0 = off)")
    _one_of("logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)
    if cfg.logging.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"logging.wandb_mode={cfg.logging.wandb_mode} needs the wandb package, which is not "
                         "installed here: `pip install wandb`, or set logging.wandb_mode=disabled (metrics.jsonl is "
                         "always written; `anima-ft plot RUN` draws it)")
    _positive("logging.every_steps", cfg.logging.every_steps)
    _validate_eval(cfg)
    if cfg.distill.enabled:
        from anima_ft.distill.config import validate_distill

        validate_distill(cfg.distill, max(1, len(cfg.stages)))


BUDGET_ACTIONS = ("stop", "lower_lr", "mark_best")


def _validate_eval(cfg: Config) -> None:
    """The diagnostics section: probe sets, budget and grid settings."""
    e = cfg.eval
    for key in ("probe_every_steps", "drift_every_steps", "grid_every_steps", "max_samples_per_set"):
        _positive(f"eval.{key}", getattr(e, key), allow_zero=True)
    _positive("eval.num_noises", e.num_noises)
    if not e.sigmas or not all(0.0 < float(x) <= 1.0 for x in e.sigmas):
        raise ValueError(f"eval.sigmas={list(e.sigmas)} must be a non-empty list of values in (0, 1]")
    set_names = [s.name for s in e.sets]
    for i, s in enumerate(e.sets):
        if not s.name or not s.path:
            raise ValueError(f"eval.sets.{i}={{name: {s.name!r}, path: {s.path!r}}} needs both a name and a path")
    if len(set(set_names)) != len(set_names):
        raise ValueError(f"eval.sets names must be unique, got {set_names}")
    if e.sets and e.probe_every_steps <= 0:
        raise ValueError("eval.sets are given but eval.probe_every_steps=0 (probe off); set it > 0 or drop the sets")
    if e.budget_max_rise_pct < 0:
        raise ValueError(f"eval.budget_max_rise_pct={e.budget_max_rise_pct} must be >= 0 (0 = off)")
    if e.budget_max_rise_pct > 0:
        _one_of("eval.budget_action", e.budget_action, BUDGET_ACTIONS)
        if e.budget_set not in set_names:
            raise ValueError(f"eval.budget_set={e.budget_set!r} is not one of eval.sets {set_names}; "
                             "the forgetting budget watches a probe set")
    if e.grid_every_steps > 0:
        if not e.grid_prompts or not e.grid_seeds:
            raise ValueError("eval.grid_every_steps > 0 needs eval.grid_prompts and eval.grid_seeds")
        if len(e.grid_size) != 2 or any(int(x) % 16 for x in e.grid_size):
            raise ValueError(f"eval.grid_size={list(e.grid_size)} must be [height, width], multiples of 16")
        if e.grid_vae_path and not (e.grid_qwen_path and e.grid_qwen_tokenizer_dir and e.grid_t5_tokenizer_dir):
            raise ValueError("eval.grid_vae_path is set: also set eval.grid_qwen_path, eval.grid_qwen_tokenizer_dir "
                             "and eval.grid_t5_tokenizer_dir to encode the grid prompts")
