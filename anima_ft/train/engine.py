"""DeepSpeed engine construction and stage transitions.

A frozen group (lr 0) has ``requires_grad=False`` and is left out of the optimizer: no gradients and no optimizer
state. Changing the trainable set therefore means a new engine. ``transition`` keeps the training state of groups
that stay trainable across that rebuild, parameter by parameter, through DeepSpeed's full-tensor accessors (which
work for ZeRO 1, 2 and 3): fp32 master weight, ``exp_avg``, ``exp_avg_sq`` and the AdamW step count. To bound
memory, parameter ``i`` is held on CPU only by rank ``i % world_size`` between the two engines (about 12 bytes per
trainable element / world size per rank) and broadcast from there.
"""

from __future__ import annotations

import logging

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from anima_ft.config.schema import Config

from .param_groups import apply_trainable, build_param_groups, group_of
from .stages import Stage

logger = logging.getLogger(__name__)
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def build_engine(model: nn.Module, cfg: Config, stage: Stage, ds_config: dict):
    """Freeze per ``stage``, build AdamW over the trainable groups, and wrap ``model`` in a DeepSpeed engine."""
    counts = apply_trainable(model, stage.peak_lr)
    groups = build_param_groups(model.named_parameters(), stage.peak_lr, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=max(stage.peak_lr.values()), betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    logger.info("stage %d (%s): trainable elements per group %s", stage.index, stage.name, counts)
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's ZeRO wrapper (its param groups carry our ``name`` keys)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lrs(engine, lrs: dict[str, float]) -> None:
    """Set each optimizer param group's LR from the per-group values."""
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lrs[group["group"]]


def _group_steps(engine) -> dict[str, torch.Tensor | float]:
    """AdamW step count per param-group name (0 where no step was taken yet)."""
    opt = base_optimizer(engine)
    out: dict[str, torch.Tensor | float] = {}
    for group in opt.param_groups:
        state = opt.state.get(group["params"][0], {})
        step = state.get("step", 0.0)
        out[group["name"]] = step.clone() if torch.is_tensor(step) else step
    return out


def materialize_state(engine, steps: dict[str, torch.Tensor | float] | None = None) -> None:
    """Create AdamW state now (torch creates it lazily at the first step) so it can be overwritten.

    Runs one base-optimizer step with zero gradients at lr 0, which leaves the fp32 master weights bit-identical
    (AdamW: p *= 1 - 0 * wd; p -= 0 * m / (sqrt(v) + eps)), then sets each group's step count from ``steps``
    (missing = 0, a fresh Adam).
    """
    opt = base_optimizer(engine)
    saved_lr = []
    for group in opt.param_groups:
        saved_lr.append(group["lr"])
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for group, lr in zip(opt.param_groups, saved_lr):
        group["lr"] = lr
        value = (steps or {}).get(group["name"], 0.0)
        for p in group["params"]:
            p.grad = None
            st = opt.state[p]
            st["step"] = value.clone() if torch.is_tensor(value) else torch.tensor(float(value))
            for key in _ADAM_KEYS:
                st[key].zero_()
    link = getattr(engine.optimizer, "_link_all_hp_params", None)
    if link is not None:  # ZeRO-1/2 bind their fragment views to optimizer state at link time
        link()


def transition(engine, model: nn.Module, cfg: Config, old: Stage, new: Stage, ds_config: dict):
    """Rebuild the engine for ``new``, carrying the training state of every group trainable in both stages.

    Collective: every rank must call it at the same step. Returns the new engine.
    """
    keep = old.trainable & new.trainable
    rank, world = dist.get_rank(), dist.get_world_size()
    carried: dict[str, dict[str, torch.Tensor]] = {}
    shapes: dict[str, torch.Size] = {}
    names = [n for n, p in model.named_parameters() if p.requires_grad and group_of(n) in keep]
    params = dict(model.named_parameters())
    for i, name in enumerate(names):  # every rank runs every gather (they are collectives)
        p = params[name]
        full = {"fp32": safe_get_full_fp32_param(p)}
        full.update({k: safe_get_full_optimizer_state(p, k) for k in _ADAM_KEYS})
        shapes[name] = full["fp32"].shape
        if i % world == rank:
            carried[name] = {k: v.detach().float().cpu().clone() for k, v in full.items()}
        del full
    steps = _group_steps(engine)
    engine.destroy()
    del engine
    new_engine = build_engine(model, cfg, new, ds_config)
    materialize_state(new_engine, {k: v for k, v in steps.items() if k.split("/")[0] in keep})
    device = next(iter(params.values())).device
    for i, name in enumerate(names):
        owner = i % world
        for key in ("fp32", *_ADAM_KEYS):
            if rank == owner:
                value = carried[name][key].to(device)
            else:
                value = torch.empty(shapes[name], dtype=torch.float32, device=device)
            if world > 1:
                dist.broadcast(value, src=owner)
            if key == "fp32":
                safe_set_full_fp32_param(params[name], value)
            else:
                safe_set_full_optimizer_state(params[name], value, key)
        carried.pop(name, None)
    logger.info("stage %d -> %d: kept state of %s, fresh state for %s, frozen %s", old.index, new.index,
                sorted(keep), sorted(new.trainable - keep), sorted(set(new.peak_lr) - new.trainable))
    return new_engine
