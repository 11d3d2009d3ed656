"""Distill tests run tiny models whose ops are far too small to split: one torch thread avoids spin-waiting when the
shared 2-core machine is busy (measured: a 19 s fixture took 300 s with two threads under load)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
