"""The loss hook (train/objective.py) against a float64 re-computation; the noise seeding."""

from __future__ import annotations

import torch

from anima_ft.config import load_config
from anima_ft.train.batches import SyntheticStream
from anima_ft.train.objective import compute_loss, noise_generator


class _Linear(torch.nn.Module):
    """pred = a * x_t + b * t (enough to check the objective's algebra against float64)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.7))

    def forward(self, x_t, t, qwen, qmask, ids, tmask):
        return self.a * x_t + self.b * t.view(-1, 1, 1, 1, 1)


def test_compute_loss_matches_float64_reference():
    stream = iter(SyntheticStream(8, 4, 3, 5, micro_batch_size=3, grad_accum_steps=1, dp_rank=0, dp_world_size=1,
                                  seed=0))
    batch = next(stream)
    cfg = load_config(None, ["objective.timestep_sampling=uniform"]).objective
    out = compute_loss(_Linear(), batch, noise_generator(0, 5, 0), cfg)
    g = noise_generator(0, 5, 0)  # replay the same draws in float64
    x0 = batch["latents"].double().unsqueeze(2)
    eps = torch.randn(x0.shape, generator=g).double()
    t = torch.rand(3, generator=g).double()
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    pred = 0.3 * xt - 0.7 * t.view(-1, 1, 1, 1, 1)
    ref = ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.per_sample.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref.mean(), rtol=1e-5, atol=1e-6)


def test_noise_generator_depends_on_every_coordinate():
    draws = {torch.randn(4, generator=noise_generator(*c)).sum().item()
             for c in [(0, 1, 0), (1, 1, 0), (0, 2, 0), (0, 1, 1), (0, 1, 3)]}
    assert len(draws) == 5
    assert torch.equal(torch.randn(4, generator=noise_generator(3, 4, 5)),
                       torch.randn(4, generator=noise_generator(3, 4, 5)))
