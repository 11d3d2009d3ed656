"""Timestep samplers: distributions checked against closed-form CDFs, transforms against their formulas."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from anima_ft.diffusion.timesteps import (
    flux_mu,
    flux_time_shift,
    sample_timesteps,
    shift_sigmas,
    timestep_quantiles,
)

N = 100_000
KS_LIMIT = 1.63 / math.sqrt(N)  # Kolmogorov-Smirnov critical value at the 1% level


def _unshift(t: float, s: float) -> float:
    """Inverse of t' = s t / (1 + (s - 1) t)."""
    return t / (s - (s - 1) * t)


def _cdf(x: float, method: str, scale: float, s: float) -> float:
    """Closed-form CDF of the sampled t (float64, independent of the module)."""
    u = _unshift(x, s)
    if method == "uniform":
        return u
    return NormalDist().cdf(math.log(u / (1 - u)) / scale)


def _ks(samples: torch.Tensor, method: str, scale: float, s: float) -> float:
    xs = samples.double().sort().values.tolist()
    d = 0.0
    for i, x in enumerate(xs):
        f = _cdf(x, method, scale, s)
        d = max(d, abs(f - i / len(xs)), abs(f - (i + 1) / len(xs)))
    return d


@pytest.mark.parametrize(
    "method,scale,shift",
    [
        ("logit_normal", 1.0, None),
        ("logit_normal", 1.7, None),
        ("logit_normal", 1.0, 3.0),
        ("uniform", 1.0, None),
        ("uniform", 1.0, 2.0),
    ],
)
def test_sample_distribution_matches_cdf(method, scale, shift):
    g = torch.Generator().manual_seed(123)
    t = sample_timesteps(N, method=method, sigmoid_scale=scale, shift=shift, generator=g)
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert _ks(t, method, scale, shift or 1.0) < KS_LIMIT


def test_quantiles_match_formula_and_empirical():
    q = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    got = timestep_quantiles(q, "logit_normal", sigmoid_scale=1.3, shift=2.5)
    for qi, gi in zip(q.tolist(), got.tolist()):
        base = 1 / (1 + math.exp(-1.3 * NormalDist().inv_cdf(qi)))
        assert gi == pytest.approx(2.5 * base / (1 + 1.5 * base), abs=1e-12)
    samples = sample_timesteps(N, "logit_normal", 1.3, shift=2.5, generator=torch.Generator().manual_seed(7))
    emp = torch.quantile(samples.double(), q)
    torch.testing.assert_close(emp, got, rtol=0, atol=0.01)
    assert timestep_quantiles(torch.tensor([0.5], dtype=torch.float64), "logit_normal").item() == 0.5


def test_shift_formula_and_fixed_points():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    torch.testing.assert_close(shift_sigmas(t, s), s * t / (1 + (s - 1) * t))
    assert shift_sigmas(t, s)[0] == 0 and shift_sigmas(t, s)[-1] == 1
    torch.testing.assert_close(shift_sigmas(t, 1.0), t)
    assert bool((shift_sigmas(t, s)[1:-1] > t[1:-1]).all())  # s > 1 moves mass towards noise
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(t, 0.0)


def test_flux_shift_formula():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(64 * 64) == pytest.approx(1.15) and flux_mu(2176) == pytest.approx(0.825)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    mu = flux_mu(1024)
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    torch.testing.assert_close(flux_time_shift(t, mu), expected)
    q = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    got = timestep_quantiles(q, "uniform", flux_shift=True, image_seq_len=1024)
    torch.testing.assert_close(got, math.exp(mu) / (math.exp(mu) + (1 / q - 1)))


def test_flux_shift_sampling_uses_image_seq_len():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    base = sample_timesteps(1000, generator=g1)
    shifted = sample_timesteps(1000, flux_shift=True, image_seq_len=4096, generator=g2)
    torch.testing.assert_close(shifted, flux_time_shift(base.double(), 1.15).float())


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="alternatives"):
        sample_timesteps(4, shift=3.0, flux_shift=True, image_seq_len=1024)
    with pytest.raises(ValueError, match="image_seq_len"):
        sample_timesteps(4, flux_shift=True)
    with pytest.raises(ValueError, match="unknown"):
        sample_timesteps(4, method="cosine")


def test_seeded_draws_repeat():
    a = sample_timesteps(16, generator=torch.Generator().manual_seed(9))
    b = sample_timesteps(16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
