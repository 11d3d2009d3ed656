"""Kernel test setup: run Triton in interpreter mode on CPU-only machines (helpers live in kernel_helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

# The interpreter must be chosen before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel tests run: the GPU when present, else the CPU under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    from kernel_helpers import DEVICE

    return DEVICE
