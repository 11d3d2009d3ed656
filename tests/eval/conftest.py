"""Fixtures for the eval tests: a tiny float64 Anima and a small in-memory eval set."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import make_samples, randomize_


@pytest.fixture
def tiny_model_f64():
    """A tiny Anima in float64 with all parameters randomized."""
    from anima_ft.model import AnimaConfig, build_anima

    return randomize_(build_anima(AnimaConfig.tiny(), dtype=torch.float64, seed=0), seed=1)


@pytest.fixture
def samples():
    return make_samples()
