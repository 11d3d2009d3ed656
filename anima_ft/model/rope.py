"""Rotary position tables (half-split convention), computed in fp32 (docs/model.md#rope).

Every function returns ``(cos_L_D, sin_L_D)`` with the angle table duplicated over both halves of the head dim, the
layout ``anima_kernels.reference.apply_rope`` expects.
Tables are recomputed, never read from a checkpoint (docs/model.md#pitfall-9).
"""

from __future__ import annotations

import torch


def rope3d_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim split ``(dim_t, dim_h, dim_w)`` of Cosmos' 3D RoPE: h = w = head_dim//6*2, t gets the rest."""
    dim_hw = head_dim // 6 * 2
    return head_dim - 2 * dim_hw, dim_hw, dim_hw


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    """``theta ** -(2i/dim)`` for i = 0 .. dim/2-1, in float64 (cast by the caller)."""
    return theta ** -(torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)


def rope3d_table(
    num_frames: int,
    height: int,
    width: int,
    head_dim: int,
    extrapolation: tuple[float, float, float] = (1.0, 4.0, 4.0),
    base_theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE for a ``(T, H, W)`` token grid flattened t-major, w fastest; positions start at 0.

    NTK scaling: ``theta_a = base * ratio_a ** (dim_a / (dim_a - 2))`` per axis a in (t, h, w); per-token angles are
    ``cat(t*f_t, h*f_h, w*f_w)``, duplicated over both halves.
    """
    dims = rope3d_split(head_dim)
    freqs = [
        _inv_freq(dim, base_theta * ratio ** (dim / (dim - 2))) for dim, ratio in zip(dims, extrapolation, strict=True)
    ]
    t = torch.arange(num_frames, dtype=torch.float64)
    h = torch.arange(height, dtype=torch.float64)
    w = torch.arange(width, dtype=torch.float64)
    ang_t = (t[:, None] * freqs[0])[:, None, None, :].expand(num_frames, height, width, -1)
    ang_h = (h[:, None] * freqs[1])[None, :, None, :].expand(num_frames, height, width, -1)
    ang_w = (w[:, None] * freqs[2])[None, None, :, :].expand(num_frames, height, width, -1)
    angles = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(num_frames * height * width, head_dim // 2)
    full = torch.cat([angles, angles], dim=-1)
    return full.cos().float().to(device), full.sin().float().to(device)


def rope1d_table(
    length: int, head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1D RoPE for positions ``0..length-1`` (HF style: inv_freq over even dims, ``emb = cat(f, f)``)."""
    pos = torch.arange(length, dtype=torch.float64)
    angles = pos[:, None] * _inv_freq(head_dim, theta)[None, :]
    full = torch.cat([angles, angles], dim=-1)
    return full.cos().float().to(device), full.sin().float().to(device)
