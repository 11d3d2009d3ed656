"""DeepSpeed engine construction and stage transitions.

A frozen group (lr 0) has ``requires_grad=False`` and is left out of the optimizer: no gradients and no optimizer
state. Changing the trainable set therefore means a new engine. ``transition`` keeps the training state of groups
that stay trainable across that rebuild, parameter by parameter, through DeepSpeed's full-tensor accessors (which
work for ZeRO 1, 2 and 3): fp32 master weight, ``exp_avg``, ``exp_avg_sq``, the EMA if on, and the AdamW step
count. To bound
memory, parameter ``i`` is held on CPU only by rank ``i % world_size`` between the two engines (about 12 bytes per
trainable element / world size per rank) and broadcast from there.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

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

from .export import EMA_KEY
from .param_groups import apply_trainable, build_param_groups, group_of
from .stages import Stage

logger = logging.getLogger(__name__)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def build_engine(model: nn.Module, cfg: Config, stage: Stage, ds_config: dict):
    """Freeze per ``stage``, build AdamW over the trainable groups, and wrap ``model`` in a DeepSpeed engine."""
    if ds_config["zero_optimization"]["stage"] == 3 and hasattr(model, "external_parameter_uses"):
        # parameters read outside their owner's forward must be gathered with the reading module (idempotent)
        for module, param in model.external_parameter_uses():
            deepspeed.zero.register_external_parameter(module, param)
    counts = apply_trainable(model, stage.peak_lr)
    groups = build_param_groups(model.named_parameters(), stage.peak_lr, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=max(stage.peak_lr.values()), betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    logger.info("stage %d (%s): trainable elements per group %s", stage.index, stage.name, counts)
    logger.info("DeepSpeed ZeRO-%d, %s, optimizer state %s", engine.zero_optimization_stage(),
                "bf16 with fp32 master weights" if engine.bfloat16_enabled() else "fp32",
                "offloaded to CPU memory" if engine.zero_cpu_offload() else "on the training device")
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's ZeRO wrapper (its param groups carry our ``name`` keys)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lrs(engine, lrs: dict[str, float]) -> None:
    """Set each optimizer param group's LR from the per-group values."""
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lrs[group["group"]]


def _flat_params(engine) -> list[tuple[dict, torch.Tensor]]:
    """(param group, fp32 flat partition) pairs that the base optimizer keeps state for, on this rank.

    ZeRO-1/2 leave the flat partitions in ``param_groups``; ZeRO-3 keeps them apart (``fp32_partitioned_groups_flat``,
    one per sub-group) and empties ``param_groups[i]["params"]`` between steps.
    """
    zero, opt = engine.optimizer, base_optimizer(engine)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        return [(opt.param_groups[zero.sub_group_to_group_id[i]], flat) for i, flat in enumerate(flats)]
    return [(group, p) for group in opt.param_groups for p in group["params"]]


def group_steps(engine) -> dict[str, torch.Tensor | float]:
    """AdamW step count per param-group name (0 where no step was taken yet)."""
    opt = base_optimizer(engine)
    out: dict[str, torch.Tensor | float] = {}
    for group, flat in _flat_params(engine):
        step = opt.state.get(flat, {}).get("step", 0.0)
        out[group["name"]] = step.clone() if torch.is_tensor(step) else step
    return out


def materialize_state(engine, steps: dict[str, torch.Tensor | float] | None = None, ema: bool = False) -> None:
    """Create AdamW state now (torch creates it lazily at the first step) so it can be overwritten or extended.

    The state is what ``torch.optim.AdamW`` would create (zero moments, step 0), except that each group's step
    count comes from ``steps`` (missing = 0, a fresh Adam); the weights are not touched. With ``ema``, an
    ``"ema"`` entry starts as a copy of the fp32 master partition (see ``ema.py``).
    """
    opt = base_optimizer(engine)
    for group, flat in _flat_params(engine):
        value = (steps or {}).get(group["name"], 0.0)
        opt.state[flat] = {
            "step": value.clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float32),
            "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
        }
        if ema:
            opt.state[flat][EMA_KEY] = flat.detach().clone()
    relink_optimizer_state(engine)


def update_ema(engine, decay: float) -> None:
    """``EMA <- decay * EMA + (1 - decay) * W`` on this rank's fp32 master partitions (call after an applied step).

    The EMA lives in the optimizer state under ``"ema"``, so it is sharded exactly like the master weights, saved
    and loaded with the optimizer shards and carried across stage transitions like the Adam moments.
    """
    opt = base_optimizer(engine)
    with torch.no_grad():
        for _, flat in _flat_params(engine):
            opt.state[flat][EMA_KEY].lerp_(flat.detach(), 1.0 - decay)


def set_full_state(param: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write the full fp32 master weight (``key`` None) or optimizer-state entry ``key`` of ``param`` into this rank's
    partition: DeepSpeed's ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``, except under ZeRO-3.

    Workaround: DeepSpeed 0.19.8's ZeRO-3 setter narrows ``value`` at ``rank * partition_size`` for
    ``partition_size = ceil(numel / world)`` elements, which runs past the end of ``value`` on the ranks that hold
    the padding when ``numel`` is not a multiple of the world size. Here those ranks copy only their real elements.
    """
    if not hasattr(param, "ds_id"):  # ZeRO-1/2
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    if not param.requires_grad:
        return
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    flat = value.detach().reshape(-1)
    start = part.numel() * zero._get_param_partition_rank(param)
    count = max(0, min(part.numel(), flat.numel() - start))
    part.data[:count].copy_(flat[start:start + count])


def relink_optimizer_state(engine) -> None:
    """Point ZeRO-1/2's per-parameter views at the current optimizer state (no-op for ZeRO-3).

    Workaround: ZeRO-1/2 bind those views once, right after the first param group's first step, when the other
    groups have no AdamW state yet; ``safe_get_full_optimizer_state`` then fails for every group but the first.
    """
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


@dataclass
class Carry:
    """Training state of the parameters that stay trainable across a stage boundary (between two engines).

    ``tensors[name]`` ({"fp32", "exp_avg", "exp_avg_sq"[, "ema"]} on CPU) is held only by the owner rank
    ``owners[name]`` (:func:`balanced_owners`); ``steps`` is the AdamW step count per param-group name.
    """

    names: list[str]
    owners: dict[str, int]
    shapes: dict[str, torch.Size]
    keys: tuple[str, ...]
    tensors: dict[str, dict[str, torch.Tensor]]
    steps: dict[str, torch.Tensor | float]


def balanced_owners(sizes: list[int], world: int) -> list[int]:
    """The rank that holds each tensor of a carry: largest first, each to the rank holding the fewest elements so far
    (ties to the lower rank), so no rank holds more than ``sum / world + max(sizes)``. Every rank computes the same
    answer from the same sizes. (Owning by index, ``i % world``, put 2.3 GB more on one of two ranks at the
    full-size stage transition: docs/full_size_cpu.md#defects.)"""
    load, owners = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += sizes[i]
    return owners


def collect_carry(engine, model: nn.Module, cfg: Config, old: Stage, new: Stage) -> Carry:
    """Gather the state of every group trainable in both ``old`` and ``new`` (collective: all ranks call it)."""
    keep = old.trainable & new.trainable
    keys = (*ADAM_KEYS, EMA_KEY) if cfg.ema.decay > 0 else ADAM_KEYS
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [n for n, p in model.named_parameters() if p.requires_grad and group_of(n) in keep]
    relink_optimizer_state(engine)
    params = dict(model.named_parameters())
    shapes = {n: params[n].ds_shape if hasattr(params[n], "ds_shape") else params[n].shape for n in names}
    owners = dict(zip(names, balanced_owners([torch.Size(shapes[n]).numel() for n in names], world)))
    carry = Carry(names, owners, {}, keys, {},
                  {k: v for k, v in group_steps(engine).items() if k.split("/")[0] in keep})
    for name in names:  # every rank runs every gather (they are collectives)
        p = params[name]
        full = {"fp32": safe_get_full_fp32_param(p)}
        full.update({k: safe_get_full_optimizer_state(p, k) for k in keys})
        carry.shapes[name] = full["fp32"].shape
        if owners[name] == rank:
            carry.tensors[name] = {k: v.detach().float().cpu().clone() for k, v in full.items()}
        del full
    return carry


def restore_carry(engine, model: nn.Module, carry: Carry, ema: bool) -> None:
    """Create the new engine's optimizer state and write ``carry`` into it (collective: all ranks call it)."""
    materialize_state(engine, carry.steps, ema=ema)
    rank, world = dist.get_rank(), dist.get_world_size()
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    for name in carry.names:
        owner = carry.owners[name]
        for key in ("fp32", *carry.keys):
            if rank == owner:
                value = carry.tensors[name][key].to(device)
            else:
                value = torch.empty(carry.shapes[name], dtype=torch.float32, device=device)
            if world > 1:
                dist.broadcast(value, src=owner)
            set_full_state(params[name], value, None if key == "fp32" else key)
        carry.tensors.pop(name, None)


def transition(holder, model: nn.Module, cfg: Config, old: Stage, new: Stage, ds_config: dict) -> None:
    """Rebuild ``holder.engine`` for stage ``new``, carrying the state of every group trainable in both stages.

    ``holder`` (the trainer) owns the only reference to the engine, so the old engine's optimizer memory is released
    before the new one is allocated. Collective: every rank must call it at the same step.
    """
    carry = collect_carry(holder.engine, model, cfg, old, new)
    holder.engine.destroy()
    holder.engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    holder.engine = build_engine(model, cfg, new, ds_config)
    restore_carry(holder.engine, model, carry, ema=cfg.ema.decay > 0)
    keep = old.trainable & new.trainable
    logger.info("stage %d -> %d: kept state of %s, fresh state for %s, frozen %s", old.index, new.index,
                sorted(keep), sorted(new.trainable - keep), sorted(set(new.peak_lr) - new.trainable))
