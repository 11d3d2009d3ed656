"""Euler flow sampler with classifier-free guidance (docs/model.md#sampling).

Schedule (diffusers' Anima pipeline: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` fed ``linspace(1, 1/N, N)``)::

    sigma_i = s * u_i / (1 + (s - 1) * u_i),   u = linspace(1, 1/N, N),   then a final sigma_N = 0

Euler step, starting from ``x = eps`` at sigma_0 = 1::

    v   = v_u + g * (v_c - v_u)                     # CFG; g = 1 or no uncond context: v = v_c
    x  <- x + (sigma_{i+1} - sigma_i) * v

The velocity function receives ``(x, t_B, ctx)`` with ``t_B = sigma_i`` per sample, and ``ctx`` is the adapter
context, computed once by the caller outside the loop (the adapter does not depend on t).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from anima_ft.diffusion.timesteps import shift_sigmas

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def sigma_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float32, descending from 1 to a final 0) of the Euler sampler."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}; the sampler needs at least 1 step")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _expand_uncond(uncond: Any, batch_size: int) -> Any:
    """Broadcast a one-row uncond context tensor (e.g. the empty caption's) to the batch."""
    if isinstance(uncond, torch.Tensor) and uncond.shape[0] == 1 and batch_size > 1:
        return uncond.expand(batch_size, *uncond.shape[1:])
    return uncond


def _batch_contexts(cond: Any, uncond: Any) -> Any | None:
    """Concatenate cond and uncond contexts along the batch when both are tensors of the same shape, else None."""
    if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)):
        return None
    if cond.shape != uncond.shape:
        return None
    return torch.cat([cond, uncond], dim=0)


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 4.0,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (sigma_0) to sigma_N with Euler steps; returns x [B, ...] in float32.

    velocity_fn(x, t_B, ctx) -> v: the model's velocity (``Anima.denoise``). cond / uncond: the precomputed
    contexts (e.g. [B, 512, 1024]; uncond may have batch 1). ``uncond=None`` or ``guidance_scale == 1`` runs
    without CFG. batch_cfg: evaluate cond and uncond in one call of batch 2B when their shapes allow it.
    The state is kept in float32; ``x`` is cast to ``noise.dtype`` before each model call.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}; expected [num_steps + 1] from sigma_schedule")
    batch_size = noise.shape[0]
    use_cfg = uncond is not None and guidance_scale != 1.0
    uncond = _expand_uncond(uncond, batch_size)
    both = _batch_contexts(cond, uncond) if (use_cfg and batch_cfg) else None
    model_dtype = noise.dtype
    x = noise.float()  # [B, ...]
    sigma_list = sigmas.double().tolist()
    for sigma, sigma_next in zip(sigma_list[:-1], sigma_list[1:]):
        t_B = torch.full((batch_size,), sigma, device=x.device, dtype=torch.float32)
        x_in = x.to(model_dtype)
        if not use_cfg:
            v = velocity_fn(x_in, t_B, cond).float()
        elif both is not None:
            v_c, v_u = velocity_fn(torch.cat([x_in, x_in]), torch.cat([t_B, t_B]), both).float().chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        else:
            v_c = velocity_fn(x_in, t_B, cond).float()
            v_u = velocity_fn(x_in, t_B, uncond).float()
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + (sigma_next - sigma) * v
    return x
