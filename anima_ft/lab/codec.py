"""A PCA patch codec: the mini-lab's stand-in for the Qwen-Image VAE (demo only; the real pipeline uses the VAE).

Each non-overlapping ``p x p`` RGB patch (``p = 8``, the VAE's downscale) of an image in ``[-1, 1]`` is a vector
``x`` of ``3 p^2`` numbers. Fitting on the lab's images gives the patch mean ``mu`` and the top-16 principal
directions ``U`` (rows, unit norm) with variances ``lambda``. Then, per patch,

    z   = U (x - mu) / s                     # encode: 16 normalized channels
    x^  = mu + U^T (s * z)                   # decode: the best rank-16 linear reconstruction

with ``s = sqrt(lambda)`` per channel (``normalize="channel"``: unit variance per channel on the fit data) or one
``s = sqrt(mean(lambda))`` for all channels (``normalize="global"``: unit mean variance, latent squared error
proportional to pixel squared error; measured worse for the lab's samples, docs/lab.md). An image ``[3, H, W]``
maps to a latent ``[16, H/8, W/8]``: the same shape contract as the VAE (``anima_ft.data.shard_format``) and, like
normalized VAE latents, roughly unit variance. The fit is a
float64 eigendecomposition of the patch covariance, deterministic for a given set of images; the fingerprint is a
hash of the fitted tensors, so shards written with another fit are refused by the loader.

Shape legend: B images, P patches per image, D = 3 p^2 patch size, C = 16 latent channels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATENT_CHANNELS = 16
PATCH = 8
NORMALIZE = ("channel", "global")  # per-channel unit variance, or one scale for all channels (PCAPatchCodec.fit)


class PCAPatchCodec:
    """Linear patch autoencoder fitted by PCA; satisfies the prepare image-encoder protocol and can decode."""

    def __init__(self, mean_D: torch.Tensor, basis_C_D: torch.Tensor, scale_C: torch.Tensor, patch: int = PATCH):
        if basis_C_D.shape != (scale_C.numel(), mean_D.numel()) or mean_D.numel() != 3 * patch * patch:
            raise ValueError(
                f"codec tensors disagree: mean {tuple(mean_D.shape)}, basis {tuple(basis_C_D.shape)}, scale "
                f"{tuple(scale_C.shape)} for patch {patch} (expected mean [{3 * patch * patch}], basis [C, D])"
            )
        self.patch = patch
        self.mean_D = mean_D.double()
        self.basis_C_D = basis_C_D.double()
        self.scale_C = scale_C.double()

    @property
    def latent_channels(self) -> int:
        """Number of latent channels C."""
        return self.basis_C_D.shape[0]

    @classmethod
    def fit(cls, pixels_B_3_H_W: torch.Tensor, channels: int = LATENT_CHANNELS, patch: int = PATCH,
            normalize: str = "channel") -> PCAPatchCodec:
        """Fit on images in ``[-1, 1]`` (H and W multiples of ``patch``); float64, deterministic.

        ``normalize``: ``channel`` divides channel c by ``sqrt(lambda_c)`` (unit variance per channel); ``global``
        divides every channel by ``sqrt(mean_c lambda_c)`` (unit variance on average, channel c keeps its share
        ``lambda_c / mean(lambda)``), so a squared error in latent space is proportional to the squared error of the
        reconstructed pixels (the basis is orthonormal) and the flow loss weighs each direction by what it draws.
        Eigenvector signs are fixed so that each direction's largest-magnitude entry is positive.
        """
        if normalize not in NORMALIZE:
            raise ValueError(f"codec normalize={normalize!r}; use one of {list(NORMALIZE)}")
        x_N_D = _to_patches(pixels_B_3_H_W.double(), patch)
        if x_N_D.shape[0] <= channels:
            raise ValueError(f"need more than {channels} patches to fit the codec, got {x_N_D.shape[0]}")
        mean_D = x_N_D.mean(dim=0)
        centered = x_N_D - mean_D
        cov_D_D = centered.T @ centered / (x_N_D.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov_D_D)  # ascending
        order = torch.argsort(evals, descending=True)[:channels]
        basis_C_D = evecs[:, order].T.contiguous()
        sign = torch.sign(basis_C_D.gather(1, basis_C_D.abs().argmax(dim=1, keepdim=True)))
        basis_C_D = basis_C_D * sign
        # A floor keeps near-zero directions (e.g. constant patches) from blowing up the normalized latent.
        scale_C = evals[order].clamp_min(1e-8 * float(evals.max())).sqrt()
        if normalize == "global":
            scale_C = torch.full_like(scale_C, float(evals[order].mean().sqrt()))
        return cls(mean_D, basis_C_D, scale_C, patch)

    def encode(self, pixels_B_3_H_W: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` -> normalized latents ``[B, C, H/p, W/p]`` (float32)."""
        B, three, H, W = pixels_B_3_H_W.shape
        if three != 3 or H % self.patch or W % self.patch:
            raise ValueError(f"codec input must be [B, 3, H, W] with H, W multiples of {self.patch}, "
                             f"got {tuple(pixels_B_3_H_W.shape)}")
        x_N_D = _to_patches(pixels_B_3_H_W.double(), self.patch)
        z_N_C = (x_N_D - self.mean_D) @ self.basis_C_D.T / self.scale_C
        h, w = H // self.patch, W // self.patch
        return z_N_C.view(B, h, w, -1).permute(0, 3, 1, 2).contiguous().float()

    def decode(self, latents_B_C_h_w: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``[B, C, h, w]`` -> images ``[B, 3, h p, w p]`` (float32, not clamped)."""
        B, C, h, w = latents_B_C_h_w.shape
        if C != self.latent_channels:
            raise ValueError(f"latents have {C} channels, the codec {self.latent_channels}")
        z_N_C = latents_B_C_h_w.double().permute(0, 2, 3, 1).reshape(-1, C)
        x_N_D = (z_N_C * self.scale_C) @ self.basis_C_D + self.mean_D
        return _from_patches(x_N_D, B, h, w, self.patch).float()

    def fingerprint(self) -> dict:
        """What makes latents compatible: codec kind, patch, channels and a hash of the fitted tensors."""
        h = hashlib.sha256()
        for t in (self.mean_D, self.basis_C_D, self.scale_C):
            h.update(t.contiguous().numpy().tobytes())
        return {"kind": "lab_pca_patch_codec", "patch": self.patch, "channels": self.latent_channels,
                "sha256": h.hexdigest()[:16]}

    def save(self, path: str | Path) -> None:
        """Write the fitted tensors to a safetensors file."""
        save_file({"mean": self.mean_D, "basis": self.basis_C_D, "scale": self.scale_C}, str(path),
                  metadata={"patch": str(self.patch)})

    @classmethod
    def load(cls, path: str | Path) -> PCAPatchCodec:
        """Read a codec written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"codec file {path} does not exist; run the lab's prepare step to fit it")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            patch = int((f.metadata() or {}).get("patch", PATCH))
        t = load_file(str(path))
        return cls(t["mean"], t["basis"], t["scale"], patch)


def _to_patches(x_B_3_H_W: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, 3, H, W] -> [B * (H/p) * (W/p), 3 p p]``, patches in row-major (h, w) order, channel-major inside."""
    B, c, H, W = x_B_3_H_W.shape
    x = x_B_3_H_W.reshape(B, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, 3, p, p]
    return x.reshape(-1, c * p * p)


def _from_patches(x_N_D: torch.Tensor, B: int, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`_to_patches`: ``[B h w, 3 p p] -> [B, 3, h p, w p]``."""
    x = x_N_D.view(B, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, 3, h, p, w, p]
    return x.reshape(B, 3, h * p, w * p)
