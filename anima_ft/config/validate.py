"""Cross-field checks, run before any heavy work (model build, process-group collectives)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .deepspeed_json import check_overrides
from .distill import validate_distill
from .fields import check_fields
from .inputs import check_paths
from .remote import check_remote
from .schema import PARAM_GROUPS, Config


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


def validate(cfg: Config, world_size: int, check_files: bool = True) -> None:
    """Raise ValueError naming the first bad field (dotted key), its value and how to fix it.

    Order: every field against its own rule (finite numbers, ranges, choices: ``fields.py``), then the cross-field
    rules below, then the DeepSpeed overrides against the batch arithmetic, then (``check_files``) the paths the
    config names (``inputs.py``). ``check_files=False`` is for checking recipes on a machine without their weights
    and shards.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    check_fields(cfg, "")
    check_remote(cfg.data.remote)
    if not cfg.run.dir.strip():
        raise ValueError(f"run.dir={cfg.run.dir!r} is empty; give the run directory (checkpoints and metrics go there)")
    b = cfg.batch
    if b.global_batch_size:
        want = b.micro_batch_size * b.grad_accum_steps * world_size
        if b.global_batch_size != want:
            fix = b.global_batch_size / (b.micro_batch_size * world_size)
            raise ValueError(
                f"batch.global_batch_size={b.global_batch_size} != micro_batch_size {b.micro_batch_size} x "
                f"grad_accum_steps {b.grad_accum_steps} x world size {world_size} = {want}; set "
                f"batch.grad_accum_steps={fix:g} (if whole) or batch.global_batch_size=0 to derive it"
            )
    if cfg.model.adapter_path and not cfg.model.init_path:
        raise ValueError(f"model.adapter_path={cfg.model.adapter_path!r} needs model.init_path (the DiT file it "
                         "completes)")

    o = cfg.optim
    if o.grad_clip == 0 and cfg.dist.precision == "fp32":
        raise ValueError("optim.grad_clip=0 with dist.precision=fp32 turns off DeepSpeed's non-finite gradient check "
                         "(steps with NaN/inf would be applied); set optim.grad_clip > 0 or use bf16")
    if len(o.betas) != 2:
        raise ValueError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    for g in PARAM_GROUPS:
        v = getattr(o.lr, g)
        if v < 0:
            raise ValueError(f"optim.lr.{g}={v} must be >= 0 (0 freezes the group; -1 = inherit is for stages)")

    if not cfg.stages and cfg.num_steps < 1:
        raise ValueError(f"num_steps={cfg.num_steps} must be > 0 (or give stages)")
    names = {s.name for s in cfg.data.sources}
    for i, st in enumerate(cfg.stages):
        where = f"stages.{i}"
        if st.warmup_steps > st.num_steps:
            raise ValueError(f"{where}.warmup_steps={st.warmup_steps} must be <= {where}.num_steps={st.num_steps}")
        rf = st.replay_fraction
        if rf != -1.0 and cfg.data.sources and not {"target", "replay"} <= names:
            raise ValueError(
                f"{where}.replay_fraction={rf} needs data sources named 'target' and 'replay'; have {sorted(names)}"
            )
    for i, lrs in enumerate(effective_lrs(cfg)):
        if not any(v > 0 for v in lrs.values()):
            keys = [f"stages.{i}.lr.{g}" if cfg.stages and getattr(cfg.stages[i].lr, g) != -1.0 else f"optim.lr.{g}"
                    for g in PARAM_GROUPS]
            raise ValueError(f"stage {i} freezes every parameter group (all learning rates are 0: {', '.join(keys)}); "
                             "nothing to train")

    if len(names) != len(cfg.data.sources):
        raise ValueError(f"data.sources names must be unique, got {[s.name for s in cfg.data.sources]}")
    for i, s in enumerate(cfg.data.sources):
        if not s.shards:
            raise ValueError(f"data.sources.{i}.shards is empty ({s.name!r} lists no shards); give paths or globs")
    if cfg.data.sources and not any(s.weight > 0 for s in cfg.data.sources) and not any(
            st.replay_fraction != -1.0 for st in cfg.stages):
        keys = ", ".join(f"data.sources.{i}.weight={s.weight}" for i, s in enumerate(cfg.data.sources))
        raise ValueError(f"every source weight is 0 ({keys}); give at least one source a weight > 0")
    if not cfg.data.sources and cfg.data.synthetic_latent_size % 2:
        raise ValueError(f"data.synthetic_latent_size={cfg.data.synthetic_latent_size} must be even (patch 2)")

    c = cfg.checkpoint
    if check_files and c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ValueError(f"checkpoint.resume={c.resume!r}: use 'auto', 'none' or an existing checkpoint directory")
    if cfg.logging.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"logging.wandb_mode={cfg.logging.wandb_mode} needs the wandb package, which is not "
                         "installed here: `pip install wandb`, or set logging.wandb_mode=disabled (metrics.jsonl is "
                         "always written; `anima-ft plot RUN` draws it)")
    _validate_eval(cfg)
    if cfg.distill.enabled:
        validate_distill(cfg.distill, max(1, len(cfg.stages)))
    check_overrides(cfg, world_size)
    if check_files:
        check_paths(cfg)


def _validate_eval(cfg: Config) -> None:
    """The diagnostics section: probe sets, budget and grid settings."""
    e = cfg.eval
    if not e.sigmas:
        raise ValueError("eval.sigmas=[] must be a non-empty list of values in (0, 1]")
    set_names = [s.name for s in e.sets]
    for i, s in enumerate(e.sets):
        if not s.name or not s.path:
            raise ValueError(f"eval.sets.{i}={{name: {s.name!r}, path: {s.path!r}}} needs both a name and a path")
    if len(set(set_names)) != len(set_names):
        raise ValueError(f"eval.sets names must be unique, got {set_names}")
    if e.sets and e.probe_every_steps <= 0:
        raise ValueError("eval.sets are given but eval.probe_every_steps=0 (probe off); set it > 0 or drop the sets")
    if e.budget_max_rise_pct > 0 and e.budget_set not in set_names:
        raise ValueError(f"eval.budget_max_rise_pct={e.budget_max_rise_pct} watches eval.budget_set="
                         f"{e.budget_set!r}, which is not one of eval.sets {set_names}; add that probe set or set "
                         "eval.budget_max_rise_pct=0")
    if e.grid_every_steps > 0:
        if not e.grid_prompts or not e.grid_seeds:
            raise ValueError(f"eval.grid_every_steps={e.grid_every_steps} needs eval.grid_prompts and eval.grid_seeds")
        if len(e.grid_size) != 2:
            raise ValueError(f"eval.grid_size={list(e.grid_size)} must be [height, width], multiples of 16")
        for i, x in enumerate(e.grid_size):
            if int(x) % 16:
                raise ValueError(f"eval.grid_size.{i}={x} must be a multiple of 16 (eval.grid_size = [height, width])")
        if e.grid_vae_path and not (e.grid_qwen_path and e.grid_qwen_tokenizer_dir and e.grid_t5_tokenizer_dir):
            raise ValueError("eval.grid_vae_path is set: also set eval.grid_qwen_path, eval.grid_qwen_tokenizer_dir "
                             "and eval.grid_t5_tokenizer_dir to encode the grid prompts")
