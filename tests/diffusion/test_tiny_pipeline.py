"""End to end on tiny weights: captions -> TextEncoder -> adapter context (once) -> Euler + CFG -> VAE decode,
checked against a plain loop that calls the full model (context recomputed every step, cond/uncond separately)."""

from __future__ import annotations

import pytest
import torch

from anima_ft.diffusion.sampler import euler_sample, sigma_schedule
from anima_ft.model import AnimaConfig, build_anima
from anima_ft.model.text_encoder import TextEncoder, tiny_qwen3
from anima_ft.model.tokenizers import load_tokenizers
from anima_ft.model.vae import AnimaVAE, tiny_vae

KEYS = ("qwen_states", "qwen_mask", "t5_ids", "t5_mask")


@pytest.fixture(scope="module")
def stack(tokenizer_dir):
    cfg = AnimaConfig.tiny()
    model = build_anima(cfg, device="cpu", dtype=torch.float64, seed=0).eval()
    text = TextEncoder(
        tiny_qwen3(seed=0).double(), *load_tokenizers(tokenizer_dir / "qwen3_06b", tokenizer_dir / "t5_old")
    )
    return model, text


def test_sampler_with_precomputed_context_matches_full_model_loop(stack):
    model, text = stack
    captions = ["1girl, solo, smiling", "a red car at night"]
    cond_in = text.encode(captions)
    uncond_in = text.encode([""])
    with torch.no_grad():
        cond = model.encode_context(*(cond_in[k] for k in KEYS))
        uncond = model.encode_context(*(uncond_in[k] for k in KEYS))
    assert torch.isfinite(uncond).all()  # the fully masked empty caption must not give NaN (docs/model.md#pitfall-3)
    noise = torch.randn(2, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = sigma_schedule(2, shift=3.0)
    out = euler_sample(model.denoise, noise, sigmas, cond, uncond, guidance_scale=4.0)

    # reference: the full forward (adapter included) per step, cond and uncond as separate calls
    uncond_b = [uncond_in[k].expand(2, *uncond_in[k].shape[1:]) for k in KEYS]
    x = noise.clone()
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            t = torch.full((2,), float(sigmas[i]), dtype=torch.float64)
            v_c = model(x, t, *(cond_in[k] for k in KEYS))
            v_u = model(x, t, *uncond_b)
            x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * (v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-5)

    vae = AnimaVAE(tiny_vae(seed=0))
    pixels = vae.decode(out)
    assert pixels.shape == (2, 3, 32, 32) and float(pixels.abs().max()) <= 1.0
