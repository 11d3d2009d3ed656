"""Kernel test setup: the device fixture (tests/conftest.py selects Triton's interpreter on CPU-only machines;
helpers live in kernel_helpers.py)."""

from __future__ import annotations

import pytest


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel tests run: the GPU when present, else the CPU under TRITON_INTERPRET=1."""
    triton = pytest.importorskip("triton")
    from kernel_helpers import DEVICE

    if DEVICE == "cpu" and _version(triton.__version__) < (3, 8):
        # triton 3.6's interpreter breaks on runtime lengths in range() with numpy 2 (see kernels/README.md)
        pytest.skip(f"interpreter tests need triton >= 3.8, found {triton.__version__}")

    return DEVICE
