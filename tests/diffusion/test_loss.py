"""Flow-matching loss: float64 recomputation of the MSE and of the sd-scripts weighting formulas."""

from __future__ import annotations

import math

import pytest
import torch

from anima_ft.diffusion.loss import flow_matching_loss, loss_weight


def _reference(pred, target, t, w):
    per = []
    for b in range(pred.shape[0]):
        d = (pred[b].double() - target[b].double()).flatten()
        per.append(w(float(t[b])) * float((d * d).sum()) / d.numel())
    return torch.tensor(per, dtype=torch.float64)


WEIGHTS = {
    "none": lambda s: 1.0,
    "uniform": lambda s: 1.0,
    "sigma_sqrt": lambda s: s**-2,
    "cosmap": lambda s: 2.0 / (math.pi * (1 - 2 * s + 2 * s * s)),
}


@pytest.mark.parametrize("weighting", list(WEIGHTS))
def test_per_sample_and_mean_match_reference(weighting):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(4, 16, 1, 3, 5, generator=g)
    target = torch.randn(4, 16, 1, 3, 5, generator=g)
    t = torch.tensor([0.05, 0.3, 0.5, 0.99])
    ref = _reference(pred, target, t, WEIGHTS[weighting])
    per = flow_matching_loss(pred, target, t, weighting=weighting, reduction="none")
    assert per.dtype == torch.float32 and per.shape == (4,)
    torch.testing.assert_close(per.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        flow_matching_loss(pred, target, t, weighting=weighting).double(), ref.mean(), rtol=1e-5, atol=0
    )


def test_uniform_mean_equals_torch_mse_over_all_elements():
    """diffusion-pipe's objective: F.mse_loss over every element."""
    pred, target = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    loss = flow_matching_loss(pred, target, torch.rand(3))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))


def test_bf16_inputs_are_computed_in_fp32():
    pred, target = torch.randn(2, 16, 4, 4).bfloat16(), torch.randn(2, 16, 4, 4)
    loss = flow_matching_loss(pred, target, torch.rand(2))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred.float(), target))


def test_cosmap_weight_properties():
    """cosmap is symmetric around 0.5, peaks there at 4/pi, and is 2/pi at the ends."""
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    w = loss_weight(t, "cosmap").double()
    torch.testing.assert_close(w[2], torch.tensor(4 / math.pi, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(w[0], torch.tensor(2 / math.pi, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(w[1], w[3])


def test_bad_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="weighting"):
        flow_matching_loss(x, x, torch.rand(2), weighting="snr")
    with pytest.raises(ValueError, match="reduction"):
        flow_matching_loss(x, x, torch.rand(2), reduction="sum")
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(x, torch.zeros(2, 4), torch.rand(2))
    with pytest.raises(ValueError, match="one timestep per sample"):
        flow_matching_loss(x, x, torch.rand(3))
