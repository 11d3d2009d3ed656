"""Seeded corruption fuzzing of real ``prepare`` shards (harness: ``fuzz_shards.py``).

The default suite runs ``ANIMA_FUZZ_CASES`` cases (36: every corruption kind once); the slow suite runs
``ANIMA_FUZZ_SLOW_CASES`` (350: every kind ten times). ``ANIMA_FUZZ_SEED`` (0) picks the seed; a failing case's id
reruns alone with ``-k``.
"""

from __future__ import annotations

import os

import pytest
from fuzz_shards import KIND_NAMES, pristine_samples, run_case
from shard_factory import write_prepared_source

SEED = int(os.environ.get("ANIMA_FUZZ_SEED", "0"))
DEFAULT_CASES = int(os.environ.get("ANIMA_FUZZ_CASES", str(len(KIND_NAMES) + 1)))
SLOW_CASES = int(os.environ.get("ANIMA_FUZZ_SLOW_CASES", str(10 * len(KIND_NAMES))))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``(shard dir, key -> pristine decoded sample)``: 10 skimage images through ``prepare`` in 3 shards."""
    pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("fuzz")
    summary = write_prepared_source(root / "images", root / "pristine")
    assert summary["samples"] == 10 and summary["shards"] == 3 and summary["counts"]["undecodable_image"] == 1
    return root / "pristine", pristine_samples(root / "pristine")


def _case_id(case: int) -> str:
    return f"{case}-{KIND_NAMES[case % len(KIND_NAMES)]}"


@pytest.mark.parametrize("case", range(DEFAULT_CASES), ids=_case_id)
def test_fuzz_case(case, prepared, tmp_path):
    run_case(case, SEED, *prepared, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(DEFAULT_CASES, DEFAULT_CASES + SLOW_CASES), ids=_case_id)
def test_fuzz_case_slow(case, prepared, tmp_path):
    run_case(case, SEED, *prepared, tmp_path)
