"""The training objective: one loss hook, built once, called once per micro-batch.

Every objective has the signature ``objective(model, batch, generator) -> LossOutput`` and a ``set_stage(index)``
method; :func:`build_objective` returns :class:`FlowObjective` (plain rectified flow) or, with ``distill.enabled``,
the distillation objective (``anima_ft.distill.objective``). The trainer never branches on which one it holds.

Rectified flow (docs/model.md): ``x_t = (1 - t) x_0 + t eps``, target ``v = eps - x_0``, loss = MSE(pred, v), mean
over C, T, H, W per sample. Noise and timesteps come from a ``torch.Generator`` seeded per (run seed, step, global
micro-batch index ``j = accum_index * world_size + rank``), so a resumed run draws exactly what an uninterrupted one
would, also on another world size when ``micro_batch_size`` and ``grad_accum_steps x world_size`` are unchanged
(micro-batch ``j`` then holds the same samples, see ``anima_ft/data/plan.py``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from anima_ft.config.schema import Config, ObjectiveConfig
from anima_ft.diffusion import LossOutput, draw_noise_and_timesteps, flow_matching_loss, interpolate, velocity_target

__all__ = ["FlowObjective", "LossOutput", "Objective", "build_objective", "compute_loss", "noise_generator"]


class Objective(Protocol):
    """The loss hook the trainer calls: one signature for every objective."""

    def __call__(self, model, batch: dict, generator: torch.Generator) -> LossOutput: ...

    def set_stage(self, index: int) -> None: ...


def noise_generator(seed: int, step: int, micro_index: int) -> torch.Generator:
    """A CPU generator unique to (seed, step, global micro-batch index): draws are independent of resume position
    and of how the global batch is split into ranks and accumulation steps."""
    mixed = (seed * 1_000_003 + step) * 65_537 + micro_index * 257  # with grad_accum_steps 1 as in earlier versions
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def draw_flow_sample(x_0: torch.Tensor, generator: torch.Generator, cfg: ObjectiveConfig):
    """``(noise, t)`` for clean latents ``x_0`` [B,16,1,h,w] as the objective config says (the one training draw)."""
    return draw_noise_and_timesteps(x_0, generator, sampling=cfg.timestep_sampling, sigmoid_scale=cfg.sigmoid_scale,
                                    shift=None if cfg.shift == 1.0 else cfg.shift)


def model_inputs(model, batch: dict) -> tuple[torch.Tensor, torch.device, torch.dtype, list[torch.Tensor]]:
    """``(x_0 [B,16,1,h,w] float32, device, compute dtype, [qwen_states, qwen_mask, t5_ids, t5_mask])`` of a
    batch-contract micro-batch, on the model's device (bf16 compute under DeepSpeed bf16; losses stay float32)."""
    param = next(p for p in model.parameters())
    device, dtype = param.device, param.dtype
    x_0 = batch["latents"].to(device=device, dtype=torch.float32).unsqueeze(2)  # images: T = 1 inserted
    cond = [batch["qwen_states"].to(device=device, dtype=dtype), batch["qwen_mask"].to(device),
            batch["t5_ids"].to(device), batch["t5_mask"].to(device)]
    return x_0, device, dtype, cond


class FlowObjective:
    """Rectified-flow loss of ``model`` (engine or module with Anima's forward) on one micro-batch."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def set_stage(self, index: int) -> None:
        """The flow loss is the same in every stage."""

    def __call__(self, model, batch: dict, generator: torch.Generator) -> LossOutput:
        x_0, _, dtype, cond = model_inputs(model, batch)
        noise, t = draw_flow_sample(x_0, generator, self.cfg)
        pred = model(interpolate(x_0, noise, t).to(dtype), t.to(dtype), *cond)
        per_sample = flow_matching_loss(pred, velocity_target(x_0, noise), t, reduction="none")
        return LossOutput(per_sample.mean(), per_sample.detach())


def compute_loss(model, batch: dict, generator: torch.Generator, cfg: ObjectiveConfig) -> LossOutput:
    """The flow loss as a function (for tools and tests that hold no objective object)."""
    return FlowObjective(cfg)(model, batch, generator)


def build_objective(cfg: Config, model: nn.Module, ds_config: dict, device: torch.device | str) -> Objective:
    """The run's loss hook, built once before ``deepspeed.initialize`` (a distillation teacher is copied from the
    untouched student, and its adapter source may replace the student's adapter)."""
    if not cfg.distill.enabled:
        return FlowObjective(cfg.objective)
    from anima_ft.distill.build import build_distill

    return build_distill(cfg, cfg.distill, model, ds_config, device)
