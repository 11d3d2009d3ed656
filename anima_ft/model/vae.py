"""The Qwen-Image VAE (Wan-2.1 architecture) behind Anima's latents, through diffusers (docs/model.md#vae).

Images [B, 3, H, W] in [-1, 1] (``img01 * 2 - 1``) get a frame axis (T = 1), go through
``AutoencoderKLQwenImage``'s encoder, and the **posterior mean** is kept (never a sample). Latents are normalized
per channel with Anima's constants (docs/model.md#vae) and decoded with the inverse::

    z_norm = (z - mean[c]) / std[c]          z = z_norm * std[c] + mean[c]

Shapes: pixels [B, 3, H, W] (H, W multiples of 8; of 16 for the DiT) <-> latents [B, 16, H/8, W/8].

Weights load from a diffusers directory or from the official single file (``qwen_image_vae.safetensors``), whose
keys use the original Wan-2.1 layout, mapped here to diffusers names (the facts are those of diffusers'
``convert_wan_vae_to_diffusers``; the mapping below is our own, general in ``num_res_blocks``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
SPATIAL_FACTOR = 8
# Per-channel latent statistics (docs/model.md#vae; identical to Wan-2.1 and the diffusers defaults).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip
# Prefixes seen on VAE files saved by other tools; stripped on load.
_KNOWN_PREFIXES = ("vae.", "first_stage_model.")


# ---------------------------------------------------------------------------------------------------------------
# Official (Wan-2.1) <-> diffusers key names. Official layout (attn_scales = [], L = len(dim_mult) levels):
#   encoder.conv1 | encoder.downsamples.{i} (flat: per level num_res_blocks residual blocks, then a resample
#   except after the last level) | encoder.middle.{0,1,2} (res, attn, res) | encoder.head.{0: norm, 2: conv}
#   conv1 (quant_conv) | conv2 (post_quant_conv) | decoder.conv1 | decoder.middle.{0,1,2} |
#   decoder.upsamples.{k} (flat: per level num_res_blocks + 1 residual blocks, then a resample except the last)
#   | decoder.head.{0,2}.
# A residual block is Sequential(norm 0, SiLU, conv 2, norm 3, SiLU, Dropout, conv 6) plus an optional shortcut.
_RESIDUAL = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))  # fmt: skip
_FIXED = (("encoder.conv1.", "encoder.conv_in."), ("decoder.conv1.", "decoder.conv_in."),
          ("encoder.head.0.", "encoder.norm_out."), ("encoder.head.2.", "encoder.conv_out."),
          ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
          ("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))  # fmt: skip


def _swap(rest: str, pairs, forward: bool) -> str | None:
    """Replace the first matching prefix of ``rest`` (official -> diffusers when forward); None if none match."""
    for official, ours in pairs:
        src, dst = (official, ours) if forward else (ours, official)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def _residual(rest: str, forward: bool) -> str:
    """Rename inside a residual block; resample/time_conv names are the same in both layouts."""
    swapped = _swap(rest, _RESIDUAL, forward)
    return rest if swapped is None else swapped


def official_key_to_diffusers(key: str, num_res_blocks: int = 2) -> str:
    """One official Wan-2.1 VAE key -> its ``AutoencoderKLQwenImage`` name (ValueError if unknown)."""
    if (fixed := _swap(key, _FIXED, True)) is not None:
        return fixed
    coder, _, rest = key.partition(".")
    if coder in ("encoder", "decoder") and rest.startswith("middle."):
        _, index, tail = rest.split(".", 2)
        if index == "1":
            return f"{coder}.mid_block.attentions.0.{tail}"
        return f"{coder}.mid_block.resnets.{int(index) // 2}.{_residual(tail, True)}"
    if coder == "encoder" and rest.startswith("downsamples."):
        _, index, tail = rest.split(".", 2)
        return f"encoder.down_blocks.{index}.{_residual(tail, True)}"
    if coder == "decoder" and rest.startswith("upsamples."):
        _, index, tail = rest.split(".", 2)
        level, slot = divmod(int(index), num_res_blocks + 2)
        if slot <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{slot}.{_residual(tail, True)}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{tail}"
    raise ValueError(f"VAE key {key!r} is not part of the Wan-2.1 / Qwen-Image VAE layout")


def diffusers_key_to_official(key: str, num_res_blocks: int = 2) -> str:
    """One ``AutoencoderKLQwenImage`` key -> its official Wan-2.1 name (inverse of ``official_key_to_diffusers``)."""
    if (fixed := _swap(key, _FIXED, False)) is not None:
        return fixed
    coder, _, rest = key.partition(".")
    if coder in ("encoder", "decoder") and rest.startswith("mid_block."):
        if rest.startswith("mid_block.resnets."):
            _, _, index, tail = rest.split(".", 3)
            return f"{coder}.middle.{2 * int(index)}.{_residual(tail, False)}"
        if rest.startswith("mid_block.attentions.0."):
            return f"{coder}.middle.1.{rest[len('mid_block.attentions.0.') :]}"
    if coder == "encoder" and rest.startswith("down_blocks."):
        _, index, tail = rest.split(".", 2)
        return f"encoder.downsamples.{index}.{_residual(tail, False)}"
    if coder == "decoder" and rest.startswith("up_blocks."):
        _, level, kind, slot, tail = rest.split(".", 4)
        base = int(level) * (num_res_blocks + 2)
        if kind == "resnets":
            return f"decoder.upsamples.{base + int(slot)}.{_residual(tail, False)}"
        return f"decoder.upsamples.{base + num_res_blocks + 1}.{tail}"
    raise ValueError(f"VAE key {key!r} is not an AutoencoderKLQwenImage parameter name")


def official_to_diffusers(state: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename a whole official-layout state dict to diffusers names (tensors are not copied)."""
    return {official_key_to_diffusers(k, num_res_blocks): v for k, v in state.items()}


def diffusers_to_official(state: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLQwenImage`` state dict to the official single-file names."""
    return {diffusers_key_to_official(k, num_res_blocks): v for k, v in state.items()}


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``AutoencoderKLQwenImage`` arguments from the tensor shapes of an official-layout state dict."""
    if "encoder.conv1.weight" not in shapes or "conv2.weight" not in shapes:
        raise ValueError("not an official Wan-2.1/Qwen-Image VAE state dict: encoder.conv1 / conv2 missing")
    base_dim, z_dim = int(shapes["encoder.conv1.weight"][0]), int(shapes["conv2.weight"][0])
    enc = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
    dec = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("decoder.upsamples.")})
    resample = [i for i in enc if f"encoder.downsamples.{i}.resample.1.weight" in shapes]
    num_levels = len(resample) + 1
    num_res_blocks = (len(dec) - (num_levels - 1)) // num_levels - 1
    dim_mult = [int(shapes[f"encoder.downsamples.{lvl * (num_res_blocks + 1)}.residual.6.weight"][0]) // base_dim
                for lvl in range(num_levels)]  # fmt: skip
    temporal = [f"encoder.downsamples.{i}.time_conv.weight" in shapes for i in resample]
    return {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": dim_mult, "num_res_blocks": num_res_blocks,
            "attn_scales": [], "temperal_downsample": temporal}  # fmt: skip


def _stats(like: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, 16, 1, ...] float32 tensors on ``like``'s device, for a tensor of rank ``ndim``."""
    shape = (1, LATENT_CHANNELS) + (1,) * (ndim - 2)
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 16, ...] -> normalized ``(z - mean) / std`` in float32."""
    if z.ndim < 3 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"latents have shape {tuple(z.shape)}; expected [B, {LATENT_CHANNELS}, ...]")
    mean, std = _stats(z, z.ndim)
    return (z.float() - mean) / std


def denormalize_latents(z_norm: torch.Tensor) -> torch.Tensor:
    """Normalized latents [B, 16, ...] -> raw VAE latents ``z_norm * std + mean`` in float32."""
    if z_norm.ndim < 3 or z_norm.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"latents have shape {tuple(z_norm.shape)}; expected [B, {LATENT_CHANNELS}, ...]")
    mean, std = _stats(z_norm, z_norm.ndim)
    return z_norm.float() * std + mean


def tiny_vae(base_dim: int = 8, num_res_blocks: int = 2, seed: int = 0):
    """A small random ``AutoencoderKLQwenImage`` (Qwen-Image layout, 16 latent channels, 8x) for tests and demos.

    The RMSNorm gains are randomized too (diffusers initializes them to 1) so that key-mapping mistakes between
    norms show up in round-trip tests.
    """
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(base_dim=base_dim, z_dim=LATENT_CHANNELS, num_res_blocks=num_res_blocks)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=gen))
    return vae.eval()


class AnimaVAE(nn.Module):
    """Frozen Qwen-Image VAE with Anima's encode/decode conventions (posterior mean, per-channel normalization)."""

    def __init__(self, vae):
        """Wrap an already built ``diffusers.AutoencoderKLQwenImage`` (kept frozen, in eval mode)."""
        super().__init__()
        if int(vae.config.z_dim) != LATENT_CHANNELS:
            raise ValueError(f"the VAE has z_dim={vae.config.z_dim}; Anima needs {LATENT_CHANNELS} latent channels")
        cfg_mean, cfg_std = list(vae.config.latents_mean), list(vae.config.latents_std)
        if any(abs(a - b) > 1e-6 for a, b in zip(cfg_mean + cfg_std, LATENTS_MEAN + LATENTS_STD)):
            logger.warning("the VAE config's latents_mean/std differ from Anima's; using Anima's (docs/model.md#vae)")
        self.vae = vae.eval().requires_grad_(False)
        self._fingerprint: str | None = None

    def _apply(self, fn, *args, **kwargs):
        """Moving or casting the weights (``.to``, ``.half``, ...) invalidates the cached fingerprint."""
        self._fingerprint = None
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, diffusers_dir: str | Path, device="cpu", dtype=torch.float32) -> AnimaVAE:
        """Load from a local diffusers directory (``config.json`` + weights, or its ``vae/`` subfolder)."""
        from diffusers import AutoencoderKLQwenImage

        root = Path(diffusers_dir)
        if (root / "vae" / "config.json").is_file():
            root = root / "vae"
        if not (root / "config.json").is_file():
            raise ValueError(
                f"{diffusers_dir} is not a diffusers VAE directory (no config.json there or in vae/); "
                "pass the folder holding AutoencoderKLQwenImage's config.json, or use from_single_file"
            )
        vae = AutoencoderKLQwenImage.from_pretrained(str(root), torch_dtype=dtype, local_files_only=True)
        return cls(vae.to(device))

    @classmethod
    def from_single_file(cls, path: str | Path, config: dict | None = None, device="cpu", dtype=torch.float32):
        """Load the official single-file VAE (Wan-2.1 key layout, e.g. ``qwen_image_vae.safetensors``).

        config: ``AutoencoderKLQwenImage`` arguments; inferred from the tensor shapes when None.
        """
        from diffusers import AutoencoderKLQwenImage
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"VAE file {path} does not exist; pass the path of qwen_image_vae.safetensors")
        state = load_file(str(path))
        for prefix in _KNOWN_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
        config = dict(config) if config is not None else infer_vae_config({k: v.shape for k, v in state.items()})
        converted = official_to_diffusers(state, num_res_blocks=config.get("num_res_blocks", 2))
        with torch.device("meta"):
            vae = AutoencoderKLQwenImage(**config)
        expected = set(vae.state_dict())
        missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path}: keys do not match AutoencoderKLQwenImage({config}): missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); is this a Qwen-Image/Wan-2.1 VAE?"
            )
        converted = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
        vae.load_state_dict(converted, strict=True, assign=True)
        return cls(vae)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official Wan-2.1 key names (the single-file layout)."""
        return diffusers_to_official(self.vae.state_dict(), num_res_blocks=int(self.vae.config.num_res_blocks))

    # ------------------------------------------------------------------ encode / decode
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the VAE weights."""
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the VAE weights."""
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> normalized posterior-mean latents [B, 16, H/8, W/8] (float32)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels have shape {tuple(pixels.shape)}; expected [B, 3, H, W] RGB in [-1, 1]")
        height, width = pixels.shape[-2:]
        if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {SPATIAL_FACTOR}; "
                "resize/crop to multiples of 16 (VAE 8 x DiT patch 2)"
            )
        if float(pixels.abs().max()) > 1.5:
            raise ValueError("pixels exceed [-1, 1] (max |x| > 1.5): scale 8-bit images with x / 127.5 - 1")
        x = pixels.to(device=self.device, dtype=self.dtype)[:, :, None]  # [B, 3, 1, H, W]
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0]  # [B, 16, H/8, W/8]
        return normalize_latents(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, 16, h, w] (or [B, 16, 1, h, w]) -> pixels [B, 3, 8h, 8w] in [-1, 1] (float32)."""
        if latents.ndim == 5:
            if latents.shape[2] != 1:
                raise ValueError(f"latents {tuple(latents.shape)} have T={latents.shape[2]}; Anima images use T=1")
            latents = latents[:, :, 0]
        z = denormalize_latents(latents)  # [B, 16, h, w]
        x = self.vae.decode(z.to(device=self.device, dtype=self.dtype)[:, :, None]).sample  # [B, 3, 1, H, W]
        return x[:, :, 0].float().clamp(-1, 1)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A stable hash of the VAE config, its weights and the latent constants (stored in shards)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
            h.update(json.dumps(cfg, sort_keys=True, default=list).encode())
            h.update(json.dumps([LATENTS_MEAN, LATENTS_STD]).encode())
            for name, tensor in sorted(self.vae.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = "vae-" + h.hexdigest()[:16]
        return self._fingerprint
