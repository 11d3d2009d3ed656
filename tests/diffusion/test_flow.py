"""Float64 identities of the rectified-flow path (spec section 7)."""

from __future__ import annotations

import pytest
import torch

from anima_ft.diffusion.flow import (
    expand_t,
    interpolate,
    noisy_pair,
    predict_noise,
    predict_x0,
    velocity_target,
)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(3, 16, 4, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 16, 4, 6, generator=g, dtype=torch.float64)
    return x_0, eps


def test_endpoints_give_data_and_noise(pair):
    x_0, eps = pair
    assert torch.equal(interpolate(x_0, eps, torch.zeros(3, dtype=torch.float64)), x_0)
    assert torch.equal(interpolate(x_0, eps, torch.ones(3, dtype=torch.float64)), eps)


def test_interpolation_matches_formula_per_sample(pair):
    x_0, eps = pair
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    x_t = interpolate(x_0, eps, t)
    for b in range(3):
        expected = (1 - t[b].item()) * x_0[b] + t[b].item() * eps[b]
        torch.testing.assert_close(x_t[b], expected, rtol=0, atol=1e-15)


def test_velocity_is_time_derivative(pair):
    """v = eps - x_0 equals the central finite difference of x_t in t (exact for a linear path)."""
    x_0, eps = pair
    t, h = torch.full((3,), 0.4, dtype=torch.float64), 1e-4
    fd = (interpolate(x_0, eps, t + h) - interpolate(x_0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x_0, eps), rtol=0, atol=1e-10)


def test_x0_and_noise_recovered_from_true_velocity(pair):
    x_0, eps = pair
    t = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    x_t = interpolate(x_0, eps, t)
    v = velocity_target(x_0, eps)
    torch.testing.assert_close(predict_x0(x_t, t, v), x_0, rtol=0, atol=1e-14)
    torch.testing.assert_close(predict_noise(x_t, t, v), eps, rtol=0, atol=1e-14)


def test_noisy_pair_is_seeded_and_consistent():
    x_0 = torch.randn(2, 16, 1, 4, 4)
    t = torch.tensor([0.2, 0.8])
    x_t, target, noise = noisy_pair(x_0, t, generator=torch.Generator().manual_seed(5))
    x_t2, _, noise2 = noisy_pair(x_0, t, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noise, noise2) and torch.equal(x_t, x_t2)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, noise - x_0)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1, 1)) * x_0 + t.view(-1, 1, 1, 1, 1) * noise)


def test_noisy_pair_bf16_keeps_latent_dtype_and_fp32_target():
    x_0 = torch.randn(2, 16, 4, 4).bfloat16()
    x_t, target, noise = noisy_pair(x_0, torch.tensor([0.3, 0.6]))
    assert x_t.dtype == torch.bfloat16 and noise.dtype == torch.bfloat16 and target.dtype == torch.float32
    torch.testing.assert_close(target, noise.float() - x_0.float())


def test_expand_t_rejects_wrong_batch():
    with pytest.raises(ValueError, match="one timestep per sample"):
        expand_t(torch.zeros(4), torch.zeros(3, 2))
    assert expand_t(0.5, torch.zeros(3, 2)).ndim == 0
