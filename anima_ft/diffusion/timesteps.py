"""Training-timestep samplers for the flow objective (docs/model.md#timestep-sampling).

A base draw ``t`` in (0, 1) comes from one of:

    uniform:       t ~ U(0, 1)
    logit_normal:  t = sigmoid(sigmoid_scale * n),  n ~ N(0, 1)      (the Anima trainers' default, scale 1)

and is then optionally warped by one monotonic transform (never both):

    shift s:       t' = s * t / (1 + (s - 1) * t)                     (s > 1 moves mass towards noise)
    flux shift:    mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256),  seq_len = (H/2) * (W/2) tokens
                   t' = e^mu / (e^mu + (1/t - 1))

Because every step is monotonic, the q-quantile of the sampled t is the transform of the base q-quantile;
``timestep_quantiles`` returns it (useful for deterministic, fixed-quantile evaluation timesteps).
"""

from __future__ import annotations

import math

import torch

METHODS = ("logit_normal", "uniform")
# Linear map from the image token count to the flux shift mu: (256 tokens -> 0.5), (4096 tokens -> 1.15).
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN = 256, 4096
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Constant shift ``t' = s t / (1 + (s - 1) t)``; fixes 0 and 1, identity for ``s = 1``."""
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0 (1.0 = no shift; Anima inference uses 3.0)")
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int | float) -> float:
    """The flux shift ``mu`` for an image of ``image_seq_len = (H/2)*(W/2)`` DiT tokens (H, W: latent size)."""
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ_LEN - FLUX_BASE_SEQ_LEN)
    return FLUX_BASE_SHIFT + slope * (image_seq_len - FLUX_BASE_SEQ_LEN)


def flux_time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Resolution-dependent shift ``t' = e^mu / (e^mu + (1/t - 1))`` = ``shift_sigmas(t, e^mu)``.

    Written in the second form so t = 0 maps to 0 without a division by zero.
    """
    return shift_sigmas(t, math.exp(mu))


def _warp(t: torch.Tensor, shift: float | None, flux_shift: bool, image_seq_len: int | None) -> torch.Tensor:
    """Apply the optional shift (constant or flux) to base timesteps ``t``."""
    if shift is not None and flux_shift:
        raise ValueError(
            f"shift={shift} and flux_shift=True were both given; they are alternatives: set shift=None "
            "to use the resolution-dependent flux shift, or flux_shift=False to use the constant shift"
        )
    if shift is not None:
        return shift_sigmas(t, shift)
    if flux_shift:
        if image_seq_len is None or image_seq_len <= 0:
            raise ValueError(
                f"flux_shift=True needs image_seq_len = (H/2)*(W/2) latent tokens > 0, got {image_seq_len}"
            )
        return flux_time_shift(t, flux_mu(image_seq_len))
    return t


def sample_timesteps(
    n: int,
    method: str = "logit_normal",
    sigmoid_scale: float = 1.0,
    shift: float | None = None,
    flux_shift: bool = False,
    image_seq_len: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` training timesteps t = sigma in (0, 1) as float32 [n] (see the module docstring for formulas).

    method: "logit_normal" (``sigmoid(sigmoid_scale * N(0,1))``) or "uniform". shift: constant shift (None = off).
    flux_shift: resolution-dependent shift from ``image_seq_len`` (mutually exclusive with ``shift``).
    The draw happens on ``generator``'s device (CPU by default) and is moved to ``device``.
    """
    if method not in METHODS:
        raise ValueError(f"timestep method {method!r} is unknown; use one of {METHODS}")
    if n <= 0:
        raise ValueError(f"n={n} timesteps requested; need n >= 1")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if method == "logit_normal":
        base = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, device=draw_device))
    else:
        base = torch.rand(n, generator=generator, device=draw_device)
    t = _warp(base, shift, flux_shift, image_seq_len)
    return t.to(device=device if device is not None else draw_device, dtype=torch.float32)


def timestep_quantiles(
    q: torch.Tensor,
    method: str = "logit_normal",
    sigmoid_scale: float = 1.0,
    shift: float | None = None,
    flux_shift: bool = False,
    image_seq_len: int | None = None,
) -> torch.Tensor:
    """The q-quantiles (q in [0, 1], any shape) of the distribution ``sample_timesteps`` draws from.

    Computed in the dtype of ``q`` (pass float64 for reference values).
    """
    if method not in METHODS:
        raise ValueError(f"timestep method {method!r} is unknown; use one of {METHODS}")
    if method == "logit_normal":
        base = torch.sigmoid(sigmoid_scale * torch.special.ndtri(q))
    else:
        base = q.clone()
    return _warp(base, shift, flux_shift, image_seq_len)
