"""Backend dispatch in anima_ft/model/layers.py: a 'triton' request that cannot be served falls back to 'sdpa'
with exactly one warning, and the math is the sdpa backend's."""

from __future__ import annotations

import logging

import anima_kernels
import pytest
import torch

from anima_ft.model import AnimaConfig, build_anima
from anima_ft.model.layers import get_ops


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_ops("flash")


def test_triton_without_triton_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(anima_kernels, "triton_available", lambda: False)
    monkeypatch.setattr(anima_kernels, "_warned", set())
    model = build_anima(AnimaConfig.tiny(), dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(2, 16, model.cfg.crossattn_emb_channels, generator=g)
    t = torch.rand(2, generator=g)
    model.set_attention_backend("sdpa")
    expected = model.denoise(x, t, ctx)
    with caplog.at_level(logging.WARNING, logger="anima_kernels"):
        model.set_attention_backend("triton")
        first = model.denoise(x, t, ctx)
        model.set_attention_backend("triton")
        second = model.denoise(x, t, ctx)
    warnings = [r.getMessage() for r in caplog.records if "falling back to 'sdpa'" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert torch.equal(first, expected) and torch.equal(second, expected)
