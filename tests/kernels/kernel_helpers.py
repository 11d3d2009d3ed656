"""Shared helpers for the kernel tests: device choice, rope tables, per-dtype tolerances against float64."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative-norm error allowed per input dtype, against a float64 oracle (see kernels/README.md, "Tolerances").
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / max(||expected||, tiny)`` in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Shape equal, all finite, and relative-norm error under the dtype's tolerance.

    An all-zero expectation (e.g. dq when every row has one key) is checked with the tolerance as an absolute bound;
    structural zeros (fully masked rows) are asserted exactly by the tests themselves.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if expected.abs().max() == 0:
        peak = actual.abs().max().item()
        assert peak < REL_TOL[dtype], f"{name}: expected zeros, max |x| = {peak:.3e}"
        return
    err = rel_err(actual, expected)
    assert err < REL_TOL[dtype], f"{name}: relative error {err:.3e} >= {REL_TOL[dtype]:.1e} ({dtype})"


def rope_table(L: int, D: int, seed: int = 0, max_pos: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A half-split ``(cos [L, D], sin [L, D])`` fp32 table with random angles (duplicated over both halves)."""
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(L, D // 2, generator=g) * max_pos
    full = torch.cat([ang, ang], dim=-1)
    return full.cos(), full.sin()
