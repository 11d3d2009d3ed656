"""Euler + CFG sampler: schedule vs diffusers, exact ODE solutions for a point mass and a Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anima_ft.diffusion.sampler import euler_sample, sigma_schedule


@pytest.mark.parametrize("num_steps,shift", [(1, 3.0), (30, 3.0), (50, 3.0), (20, 1.0), (8, 5.0)])
def test_schedule_matches_diffusers_flow_match_euler(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    # What diffusers' Anima pipeline passes (modular_pipelines/anima/before_denoise.py).
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    ours = sigma_schedule(num_steps, shift=shift)
    assert ours.shape == (num_steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)


def test_point_mass_is_solved_exactly_at_every_step():
    """Data = point mass c: v(x, t) = (x - c) / t, whose ODE solution x(t) = c + t (eps - c) is linear in t,
    so each Euler step is exact: x_i = c + sigma_i (eps - c)."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 16, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 16, 1, 4, 4, generator=g, dtype=torch.float64)
    sigmas = sigma_schedule(12, shift=3.0)
    seen = []

    def velocity(x, t_B, ctx):
        seen.append((x.clone(), t_B.clone()))
        return (x - ctx) / t_B.view(-1, 1, 1, 1, 1)

    out = euler_sample(velocity, eps.float(), sigmas, cond=c.float(), uncond=None)
    for (x_i, t_i), sigma in zip(seen, sigmas[:-1].tolist()):
        assert torch.all(t_i == sigma)
        torch.testing.assert_close(x_i.double(), c + sigma * (eps - c), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), c, rtol=0, atol=1e-5)


def _gaussian_velocity(mu: float, s: float):
    """Exact velocity of the flow from N(0, 1) (t = 1) to data N(mu, s^2) (t = 0).

    x_t marginal: mean m_t = (1 - t) mu, std r_t = sqrt((1 - t)^2 s^2 + t^2); the ODE solution is
    x(t) = m_t + r_t z with z = x(1), so v = dm/dt + (dr/dt) (x - m_t) / r_t.
    """

    def v(x, t):
        t = t.double().view(-1, *([1] * (x.ndim - 1)))
        m = (1 - t) * mu
        r = torch.sqrt((1 - t) ** 2 * s * s + t * t)
        dr = ((t - 1) * s * s + t) / r
        return (-mu + dr * (x.double() - m) / r).to(x.dtype)

    return v


def test_gaussian_endpoint_converges_first_order():
    mu, s = 1.5, 0.4
    v = _gaussian_velocity(mu, s)
    z = torch.randn(4, 16, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = mu + s * z  # x(0) = m_0 + r_0 z
    errs = []
    for n in (25, 50, 100):
        out = euler_sample(lambda x, t, ctx: v(x, t), z, sigma_schedule(n, shift=3.0), cond=None)
        errs.append(float((out.double() - exact).abs().max()))
    assert errs[-1] < 0.06  # measured 0.044 at 100 steps with shift 3 (float32 state)
    for coarse, fine in zip(errs, errs[1:]):  # Euler is first order: halving the step roughly halves the error
        assert 1.6 < coarse / fine < 2.4


def test_cfg_combines_velocities_per_formula():
    """With linear fields v_c = a x + b_c, v_u = a x + b_u, CFG must integrate v_u + g (v_c - v_u)."""
    g_scale = 4.0
    b_c, b_u = 0.7, -0.2
    field = lambda x, t, ctx: -0.5 * x + ctx
    noise = torch.randn(3, 16, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    sigmas = sigma_schedule(6)
    cond = torch.full((3, 5, 8), b_c)
    uncond = torch.full((1, 5, 8), b_u)

    def velocity(x, t_B, ctx):
        assert x.shape[0] == ctx.shape[0] == t_B.shape[0]
        return field(x, t_B, ctx[:, 0, 0].view(-1, 1, 1, 1, 1))

    out_batched = euler_sample(velocity, noise, sigmas, cond, uncond, guidance_scale=g_scale)
    out_split = euler_sample(velocity, noise, sigmas, cond, uncond, guidance_scale=g_scale, batch_cfg=False)
    # reference: float64 Euler on the combined field
    x = noise.double()
    b = b_u + g_scale * (b_c - b_u)
    for i in range(len(sigmas) - 1):
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * (-0.5 * x + b)
    torch.testing.assert_close(out_batched.double(), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_split.double(), x, rtol=0, atol=1e-5)


def test_guidance_one_or_no_uncond_calls_cond_only_and_context_is_passed_unchanged():
    cond = object()
    calls = []

    def velocity(x, t_B, ctx):
        calls.append(ctx)
        return torch.zeros_like(x)

    noise = torch.randn(2, 4)
    out = euler_sample(velocity, noise, sigma_schedule(5), cond, uncond="u", guidance_scale=1.0)
    assert len(calls) == 5 and all(c is cond for c in calls)
    torch.testing.assert_close(out, noise)


def test_bf16_model_dtype_with_fp32_state():
    dtypes = []

    def velocity(x, t_B, ctx):
        dtypes.append(x.dtype)
        return torch.ones_like(x)

    out = euler_sample(velocity, torch.zeros(1, 4, dtype=torch.bfloat16), sigma_schedule(3), cond=None)
    assert set(dtypes) == {torch.bfloat16} and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 4), -1.0))  # integral of v = 1 from sigma 1 to 0
    assert not math.isnan(float(out.sum()))


def test_bad_schedule_raises():
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0)
    with pytest.raises(ValueError, match="sigmas"):
        euler_sample(lambda x, t, c: x, torch.zeros(1, 2), torch.tensor([1.0]), cond=None)
