"""The training objective: the one place the loss lives (a distillation objective can replace it later).

Rectified flow (spec section 7): ``x_t = (1 - t) x_0 + t eps``, target ``v = eps - x_0``, loss = MSE(pred, v),
mean over C, T, H, W per sample. Noise and timesteps come from a ``torch.Generator`` seeded per (run seed, step,
global micro-batch index ``j = accum_index * world_size + rank``), so a resumed run draws exactly what an
uninterrupted one would, also on another world size when ``micro_batch_size`` and ``grad_accum_steps x world_size``
are unchanged (micro-batch ``j`` then holds the same samples, see ``anima_ft/data/plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anima_ft.config.schema import ObjectiveConfig
from anima_ft.diffusion import flow_matching_loss, interpolate, sample_timesteps, velocity_target


@dataclass
class LossOutput:
    """``loss`` (scalar, what backward sees) and ``per_sample`` [B] float32 (for per-source metrics)."""

    loss: torch.Tensor
    per_sample: torch.Tensor


def noise_generator(seed: int, step: int, micro_index: int) -> torch.Generator:
    """A CPU generator unique to (seed, step, global micro-batch index): draws are independent of resume position
    and of how the global batch is split into ranks and accumulation steps."""
    mixed = (seed * 1_000_003 + step) * 65_537 + micro_index * 257  # with grad_accum_steps 1 as in earlier versions
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def compute_loss(model, batch: dict, generator: torch.Generator, cfg: ObjectiveConfig) -> LossOutput:
    """Rectified-flow loss of ``model`` (engine or module with Anima's forward) on one batch-contract micro-batch.

    batch["latents"]: [B,16,h,w] normalized latents (images: T = 1 is inserted). Returns float32 losses.
    """
    param = next(p for p in model.parameters())
    device, dtype = param.device, param.dtype  # bf16 under DeepSpeed bf16; the loss itself is float32
    x_0 = batch["latents"].to(device=device, dtype=torch.float32).unsqueeze(2)  # [B,16,1,h,w]
    B = x_0.shape[0]
    noise = torch.randn(x_0.shape, generator=generator).to(device)
    t = sample_timesteps(B, cfg.timestep_sampling, cfg.sigmoid_scale, None if cfg.shift == 1.0 else cfg.shift,
                         generator=generator).to(device)
    x_t = interpolate(x_0, noise, t)
    v = velocity_target(x_0, noise)
    pred = model(
        x_t.to(dtype),
        t.to(dtype),
        batch["qwen_states"].to(device=device, dtype=dtype),
        batch["qwen_mask"].to(device),
        batch["t5_ids"].to(device),
        batch["t5_mask"].to(device),
    )
    per_sample = flow_matching_loss(pred, v, t, reduction="none")
    return LossOutput(per_sample.mean(), per_sample.detach())
