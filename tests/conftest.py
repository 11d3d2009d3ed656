"""Shared pytest setup: GPU tests skip without CUDA; paths to optional shared assets; the conditions of bitwise claims.

Bitwise claims between processes. A CPU result is reproducible bit for bit only for the same thread count (the
intra-op thread count splits BLAS/OpenMP reductions differently, so sums round differently: on a 2-core AMD EPYC the
probe tables of 2 and 1 threads differed in the last bits), the same world size or an explicitly per-sample
computation, and the same batch composition. So every test that compares two processes (or a process and the pytest
process) with ``torch.equal`` / ``==`` / ``atol=0`` runs both sides with the same thread count: rank processes get
``OMP_NUM_THREADS=1`` (``tests/distributed/conftest.run_env``) and the in-process side of such a comparison runs inside
``with fixed_threads(RANK_THREADS):`` (or takes the ``rank_threads`` fixture). A comparison across world sizes or thread counts uses a tolerance and says so.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from anima_ft.train.distributed import use_env_extensions_dir

# Triton reads TRITON_INTERPRET when a kernel is first compiled: set it before any test imports a kernel, so CPU runs
# always use the interpreter whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

use_env_extensions_dir()  # DeepSpeed's CPU ops build into the venv, for in-process engines and every rank started here

RANK_THREADS = 1
"""Intra-op threads of every rank process the tests start, and of the in-process side of a bitwise comparison."""


@contextlib.contextmanager
def fixed_threads(num_threads: int = RANK_THREADS):
    """Run the block with ``torch.set_num_threads(num_threads)``, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def rank_threads():
    """The test runs with :data:`RANK_THREADS` intra-op threads, as the rank processes it compares against do."""
    with fixed_threads(RANK_THREADS):
        yield RANK_THREADS

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
