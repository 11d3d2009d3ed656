"""Sample grid with a tiny VAE: cells equal a hand-written Euler + CFG loop decoded by the VAE; no VAE = skip."""

from __future__ import annotations

import logging

import numpy as np
import torch
from eval_helpers import randomize_
from PIL import Image

from anima_ft.eval.sample_grid import SampleGridRunner


def _setup(tmp_path, vae):
    from anima_ft.model import AnimaConfig, build_anima

    model = randomize_(build_anima(AnimaConfig.tiny(), seed=0), seed=3, scale=0.1)
    gen = torch.Generator().manual_seed(0)
    conds = [(torch.randn(3, 32, generator=gen), torch.tensor([5, 9, 1])),
             (torch.randn(2, 32, generator=gen), torch.tensor([7, 1]))]
    runner = SampleGridRunner(["a cat", "a dog"], conds, seeds=[0, 11], vae=vae, out_dir=tmp_path, every_steps=10,
                              num_steps=3, guidance_scale=4.0, shift=3.0, latent_size=(4, 6), log_wandb=False)
    return model, conds, runner


def _reference_cell(model, qwen, t5, seed, steps=3, shift=3.0, g=4.0):
    def ctx(q, ids):
        s = q.shape[0]
        qq = torch.zeros(1, max(s, 1), 32)
        qq[0, :s] = q
        return model.encode_context(qq, (torch.arange(max(s, 1)) < s)[None], ids[None], torch.ones(1, ids.numel(), dtype=torch.bool))

    c, u = ctx(qwen, t5), ctx(torch.zeros(0, 32), torch.tensor([1]))
    u_lin = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sig = (shift * u_lin / (1 + (shift - 1) * u_lin)).tolist() + [0.0]
    x = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(seed))
    for s0, s1 in zip(sig[:-1], sig[1:]):
        t = torch.tensor([s0], dtype=torch.float32)
        v_c, v_u = model.denoise(x, t, c), model.denoise(x, t, u)
        x = x + (s1 - s0) * (v_u + g * (v_c - v_u))
    return x


def test_grid_matches_reference(tmp_path):
    from anima_ft.model.vae import AnimaVAE, tiny_vae

    vae = AnimaVAE(tiny_vae(base_dim=8))
    model, conds, runner = _setup(tmp_path, vae)
    assert runner.should_run(20) and not runner.should_run(5)
    with torch.no_grad():
        images = runner.sample_images(model)
        assert images.shape == (2, 2, 32, 48, 3) and images.dtype == torch.uint8
        for r, c in [(0, 0), (1, 1)]:  # two cells cover both prompts and both seeds
            (q, t5), seed = conds[r], [0, 11][c]
            lat = _reference_cell(model, q, t5, seed)
            torch.testing.assert_close(runner.sample_cell(model, r, c), lat, rtol=1e-5, atol=1e-5)
            ref = ((vae.decode(lat)[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
            assert (images[r, c].int() - ref.int()).abs().max() <= 1
    out = runner.run(model, 10)
    grid = np.asarray(Image.open(out["samples/path"]))
    assert out["samples/path"].endswith("samples/step_0000010.png")
    assert grid.shape == (14 + 2 * 32, 160 + 2 * 48, 3)
    assert np.array_equal(grid[14 + 32:14 + 64, 160 + 48:160 + 96], images[1, 1].numpy())


def test_no_vae_is_skipped_with_a_message(tmp_path, caplog):
    model, _, runner = _setup(tmp_path, vae=None)
    with caplog.at_level(logging.WARNING):
        assert runner.run(model, 10) == {} and runner.run(model, 20) == {}
    msgs = [r.getMessage() for r in caplog.records if "no VAE is configured" in r.getMessage()]
    assert len(msgs) == 1 and not (tmp_path / "samples").exists()
