"""Fixtures for the data tests: two small synthetic sources (target and replay) with different bucket mixes."""

from __future__ import annotations

import pytest
from shard_factory import write_source

TARGET_BUCKETS = [(64, 64), (96, 48)]
REPLAY_BUCKETS = [(64, 64), (48, 96), (96, 48)]


@pytest.fixture(scope="session")
def two_sources(tmp_path_factory):
    """``(target_dir, replay_dir, key -> bucket)``: 2 x 9 target samples, 1 x 7 replay samples."""
    root = tmp_path_factory.mktemp("sources")
    keys = write_source(root / "target", "target", TARGET_BUCKETS, num_shards=2, per_shard=9)
    keys.update(write_source(root / "replay", "replay", REPLAY_BUCKETS, num_shards=1, per_shard=7))
    return root / "target", root / "replay", keys
