"""Shared pytest setup: GPU tests skip without CUDA; paths to optional shared assets."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when a kernel is first compiled: set it before any test imports a kernel, so CPU runs
# always use the interpreter whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = REPO_ROOT.parent / "shared" / "assets" / "tokenizers"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The real Qwen3 / T5 tokenizers from ../shared/assets/tokenizers; skips when absent."""
    if not (SHARED_TOKENIZERS / "qwen3_06b" / "vocab.json").exists():
        pytest.skip(f"real tokenizers not found at {SHARED_TOKENIZERS}")
    return SHARED_TOKENIZERS
