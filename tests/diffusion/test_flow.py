"""Float64 identities of the rectified-flow path (docs/model.md#objective)."""

from __future__ import annotations

import pytest
import torch

from anima_ft.diffusion.flow import (
    draw_noise_and_timesteps,
    expand_t,
    interpolate,
    predict_noise,
    predict_x0,
    velocity_target,
)
from anima_ft.diffusion.timesteps import sample_timesteps


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


def test_training_draw_is_noise_then_timesteps_on_the_generator():
    """The one flow-matching draw: eps first, then t, both from the CPU generator (what every objective uses)."""
    x_0 = torch.randn(3, 16, 1, 4, 5, dtype=torch.float64)
    noise, t = draw_noise_and_timesteps(x_0, torch.Generator().manual_seed(5), sampling="logit_normal",
                                        sigmoid_scale=1.0, shift=3.0)
    g = torch.Generator().manual_seed(5)
    ref_noise = torch.randn(x_0.shape, generator=g)
    ref_t = sample_timesteps(3, "logit_normal", 1.0, 3.0, generator=g)
    assert torch.equal(noise, ref_noise) and torch.equal(t, ref_t)
    assert noise.dtype == torch.float32 and t.shape == (3,)


def test_training_draw_is_seeded_and_independent_of_latent_dtype():
    kw = dict(sampling="uniform", sigmoid_scale=1.0, shift=None)
    x32 = torch.zeros(2, 16, 1, 3, 3)
    a = draw_noise_and_timesteps(x32, torch.Generator().manual_seed(1), **kw)
    b = draw_noise_and_timesteps(x32.bfloat16(), torch.Generator().manual_seed(1), **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = draw_noise_and_timesteps(x32, torch.Generator().manual_seed(2), **kw)
    assert not torch.equal(a[0], c[0])


def test_expand_t_rejects_wrong_batch():
    with pytest.raises(ValueError, match="one timestep per sample"):
        expand_t(torch.zeros(4), torch.zeros(3, 2))
    assert expand_t(0.5, torch.zeros(3, 2)).ndim == 0
