"""AnimaVAE: official-layout key mapping (checked against diffusers' own converter), single-file and diffusers
loading, posterior-mean encoding with Anima's normalization (docs/model.md#vae), and decoding."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from anima_ft.model.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    AnimaVAE,
    denormalize_latents,
    diffusers_to_official,
    infer_vae_config,
    normalize_latents,
    official_to_diffusers,
    tiny_vae,
)

# docs/model.md#vae, typed in again here on purpose (the test must not read the constants it checks).
SPEC_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
             0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
SPEC_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(seed=0)


def _assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_official_names_are_accepted_by_diffusers_converter(vae):
    """Ours diffusers->official, then diffusers' convert_wan_vae_to_diffusers, gives back the original."""
    sd = vae.state_dict()
    official = diffusers_to_official(sd)
    _assert_same_state(convert_wan_vae_to_diffusers(official), sd)
    _assert_same_state(official_to_diffusers(official), sd)


def test_full_size_layout_has_194_tensors_with_known_official_names():
    with torch.device("meta"):
        full = AutoencoderKLQwenImage()
    names = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    official = diffusers_to_official(names)
    assert len(official) == 194
    assert set(convert_wan_vae_to_diffusers(official)) == set(names)
    for key in ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.3.shortcut.weight",
                "encoder.downsamples.5.time_conv.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight",
                "conv1.weight", "conv2.weight", "decoder.upsamples.3.resample.1.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.14.residual.6.weight",
                "decoder.middle.2.residual.3.gamma", "decoder.head.0.gamma"):  # fmt: skip
        assert key in official, key
    assert infer_vae_config(official) == {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                          "attn_scales": [], "temperal_downsample": [False, True, True]}  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_single_file_round_trip(vae, tmp_path, prefix):
    path = tmp_path / "qwen_image_vae.safetensors"
    official = AnimaVAE(vae).official_state_dict()
    save_file({prefix + k: v.contiguous() for k, v in official.items()}, str(path))
    loaded = AnimaVAE.from_single_file(path)
    _assert_same_state(loaded.vae.state_dict(), vae.state_dict())
    assert loaded.fingerprint() == AnimaVAE(vae).fingerprint()


def test_single_file_round_trip_other_depth(tmp_path):
    """The mapping is general in num_res_blocks (the decoder's flat indices depend on it)."""
    small = tiny_vae(num_res_blocks=1, seed=3)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in AnimaVAE(small).official_state_dict().items()}, str(path))
    _assert_same_state(AnimaVAE.from_single_file(path).vae.state_dict(), small.state_dict())


def test_from_pretrained_diffusers_dir(vae, tmp_path):
    vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    for root in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        _assert_same_state(AnimaVAE.from_pretrained(root).vae.state_dict(), vae.state_dict())
    with pytest.raises(ValueError, match="config.json"):
        AnimaVAE.from_pretrained(tmp_path / "nowhere")


def test_constants_match_spec_and_diffusers_defaults():
    assert list(LATENTS_MEAN) == SPEC_MEAN and list(LATENTS_STD) == SPEC_STD
    with torch.device("meta"):
        cfg = AutoencoderKLQwenImage().config
    assert list(cfg.latents_mean) == SPEC_MEAN and list(cfg.latents_std) == SPEC_STD


def test_normalization_formula_and_inverse():
    z = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    mean = torch.tensor(SPEC_MEAN, dtype=torch.float64).view(1, 16, 1, 1)
    std = torch.tensor(SPEC_STD, dtype=torch.float64).view(1, 16, 1, 1)
    torch.testing.assert_close(normalize_latents(z).double(), (z - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z)).double(), z, rtol=1e-6, atol=1e-6)


def test_encode_is_normalized_posterior_mean(vae):
    ref = tiny_vae(seed=0).double()
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    latents = AnimaVAE(ref).encode(pixels)
    assert latents.shape == (2, 16, 4, 6) and latents.dtype == torch.float32
    z = ref.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]  # diffusers' posterior mean
    mean = torch.tensor(SPEC_MEAN, dtype=torch.float64).view(1, 16, 1, 1)
    std = torch.tensor(SPEC_STD, dtype=torch.float64).view(1, 16, 1, 1)
    torch.testing.assert_close(latents.double(), (z - mean) / std, rtol=1e-6, atol=1e-6)
    # the posterior mean is deterministic (no sampling)
    assert torch.equal(AnimaVAE(ref).encode(pixels), latents)


def test_decode_inverts_normalization(vae):
    ref = tiny_vae(seed=0).double()
    z_norm = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pixels = AnimaVAE(ref).decode(z_norm)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    mean = torch.tensor(SPEC_MEAN, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(SPEC_STD, dtype=torch.float64).view(1, 16, 1, 1, 1)
    expected = ref.decode(z_norm[:, :, None] * std + mean).sample[:, :, 0]
    torch.testing.assert_close(pixels.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(AnimaVAE(ref).decode(z_norm[:, :, None]), pixels)  # [B,16,1,h,w] accepted


def test_bad_inputs_raise(vae):
    wrapped = AnimaVAE(vae)
    with pytest.raises(ValueError, match="multiple of 8"):
        wrapped.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="127.5"):
        wrapped.encode(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        wrapped.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="T=1"):
        wrapped.decode(torch.zeros(1, 16, 2, 2, 2))


def test_fingerprint_tracks_weights(vae):
    a = AnimaVAE(tiny_vae(seed=0)).fingerprint()
    assert a == AnimaVAE(tiny_vae(seed=0)).fingerprint()
    assert a != AnimaVAE(tiny_vae(seed=1)).fingerprint()


def test_fingerprint_follows_dtype_cast_and_tiny_vae_keeps_global_rng():
    wrapped = AnimaVAE(tiny_vae(seed=0))
    fp32 = wrapped.fingerprint()
    wrapped.to(torch.float64)
    assert wrapped.fingerprint() != fp32
    state = torch.random.get_rng_state()
    tiny_vae(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
