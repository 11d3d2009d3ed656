"""Flow-matching loss with the optional sd-scripts weighting schemes (docs/model.md#objective).

Per sample b, with prediction ``p``, target ``v = eps - x_0`` and timestep ``t_b = sigma_b``::

    loss_b = w(t_b) * mean_{c,h,w} (p_b - v_b)^2          (computed in float32)

    w(t) = 1                                  "none" / "uniform"  (the Anima trainers' default)
    w(t) = t^-2                               "sigma_sqrt"        (sd-scripts; unbounded as t -> 0)
    w(t) = 2 / (pi * (1 - 2 t + 2 t^2))       "cosmap"            (sd-scripts / SD3)

``reduction="mean"`` averages loss_b over the batch; with equal-size samples and w = 1 this is diffusion-pipe's
mean over all elements. ``reduction="none"`` returns the per-sample vector [B] (for per-source metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WEIGHTINGS = ("none", "uniform", "sigma_sqrt", "cosmap")
REDUCTIONS = ("mean", "none")


def loss_weight(t: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """The per-sample weight ``w(t)`` [B] in float32 for one of ``WEIGHTINGS`` (formulas in the module docstring)."""
    t = t.float()
    if weighting in ("none", "uniform"):
        return torch.ones_like(t)
    if weighting == "sigma_sqrt":
        return t.pow(-2.0)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t * t))
    raise ValueError(f"loss weighting {weighting!r} is unknown; use one of {WEIGHTINGS}")


def flow_matching_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    weighting: str = "none",
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted MSE between the predicted and target velocity, in float32.

    pred, target: [B, ...] (any dtype; cast to float32). t: [B] timesteps (sigma) used for the weighting.
    Returns a scalar for ``reduction="mean"`` or the per-sample loss [B] for ``reduction="none"``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if t.ndim != 1 or t.shape[0] != pred.shape[0]:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected one timestep per sample, shape [{pred.shape[0]}]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is unknown; use one of {REDUCTIONS}")
    sq_err = (pred.float() - target.float()).pow(2)  # [B, ...]
    per_sample = sq_err.flatten(1).mean(dim=1) * loss_weight(t.to(pred.device), weighting)  # [B]
    return per_sample.mean() if reduction == "mean" else per_sample


@dataclass
class LossOutput:
    """What every training objective returns: ``loss`` (scalar, what backward sees) and ``per_sample`` [B] float32
    (detached, for per-source metrics)."""

    loss: torch.Tensor
    per_sample: torch.Tensor
