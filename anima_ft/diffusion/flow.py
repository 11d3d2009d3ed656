"""The rectified-flow (velocity) path used by Anima (docs/model.md#objective).

With data ``x_0`` (normalized VAE latents), noise ``eps ~ N(0, I)`` and ``t = sigma in [0, 1]``::

    x_t    = (1 - t) * x_0 + t * eps        # t = 0: data, t = 1: pure noise
    v      = eps - x_0                      # the velocity target, d x_t / d t
    x0_hat = x_t - t * v                    # denoised estimate from a predicted velocity
    eps_hat = x_t + (1 - t) * v             # noise estimate from a predicted velocity

The timestep the DiT receives is ``t`` itself (sigma), never ``1000 * t`` (docs/model.md#pitfall-4).
``t`` is a per-sample tensor ``[B]`` (or a float) and is broadcast over the remaining dimensions.
"""

from __future__ import annotations

import torch


def expand_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``t`` [B] to ``[B, 1, ..., 1]`` so it broadcasts against ``x`` [B, ...].

    A Python float or a 0-d tensor is returned as a 0-d tensor on ``x``'s device.
    """
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t has shape {tuple(t.shape)} but x has batch {x.shape[0]}: pass one timestep per sample, shape [B]"
        )
    return t.view(-1, *([1] * (x.ndim - 1)))


def interpolate(x_0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The noisy sample ``x_t = (1 - t) * x_0 + t * eps``; same shape and dtype as ``x_0``."""
    if x_0.shape != noise.shape:
        raise ValueError(f"x_0 {tuple(x_0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    t_ = expand_t(t, x_0).to(x_0.dtype)
    return (1 - t_) * x_0 + t_ * noise


def velocity_target(x_0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = eps - x_0`` (independent of t)."""
    if x_0.shape != noise.shape:
        raise ValueError(f"x_0 {tuple(x_0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    return noise - x_0


def predict_x0(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """Denoised estimate ``x0_hat = x_t - t * v`` from a (predicted) velocity."""
    t_ = expand_t(t, x_t).to(v.dtype)
    return x_t - t_ * v


def predict_noise(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """Noise estimate ``eps_hat = x_t + (1 - t) * v`` from a (predicted) velocity."""
    t_ = expand_t(t, x_t).to(v.dtype)
    return x_t + (1 - t_) * v


def draw_noise_and_timesteps(
    x_0: torch.Tensor,
    generator: torch.Generator,
    *,
    sampling: str,
    sigmoid_scale: float,
    shift: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching training draw for clean latents ``x_0`` [B, ...]: ``(eps ~ N(0, I), t [B])``.

    Both are drawn on the CPU ``generator`` (noise first, then t, always in that order, so a seeded generator gives
    the same draws on any device) and returned float32 on ``x_0``'s device. ``t`` follows
    :func:`anima_ft.diffusion.timesteps.sample_timesteps` (``sampling``, ``sigmoid_scale``, ``shift``; None = off).
    """
    from .timesteps import sample_timesteps

    noise = torch.randn(x_0.shape, generator=generator).to(x_0.device)
    t = sample_timesteps(x_0.shape[0], sampling, sigmoid_scale, shift, generator=generator).to(x_0.device)
    return noise, t
