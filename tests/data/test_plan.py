"""The mixing plan: exact per-global-batch counts with carried error, bucket purity, per-epoch coverage."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anima_ft.data.plan import MixPlanner, split_counts
from anima_ft.data.sources import SourceSpec, build_catalog


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=4).filter(lambda w: sum(w) > 0), st.integers(1, 64),
       st.integers(1, 30))
def test_split_counts_exact_in_the_long_run(raw, total, steps):
    """sum = total every batch; cumulative count within 1 (two sources) or 2 of w * total * steps (exact rational)."""
    weights = [w / sum(raw) for w in raw]
    carry, cumulative = [0.0] * len(raw), [0] * len(raw)
    for step in range(1, steps + 1):
        counts, carry = split_counts(weights, carry, total)
        assert sum(counts) == total and all(c >= 0 for c in counts)
        cumulative = [a + c for a, c in zip(cumulative, counts)]
        for s, w in enumerate(raw):
            exact = Fraction(w, sum(raw)) * total * step
            assert abs(cumulative[s] - exact) < (1 if len(raw) <= 2 else 2) + 1e-9
            if w == 0:
                assert counts[s] == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(1, 128), st.integers(1, 20))
def test_two_sources_round_per_batch(percent, total, steps):
    """Two sources: n_replay = f*B when integral, else floor or ceil of f*B (within one)."""
    f = percent / 100
    carry = [0.0, 0.0]
    for _ in range(steps):
        (n_target, n_replay), carry = split_counts([1 - f, f], carry, total)
        exact = Fraction(percent, 100) * total
        if exact.denominator == 1:
            assert n_replay == exact
        else:
            assert math.floor(exact) <= n_replay <= math.ceil(exact)


@pytest.mark.parametrize("world,accum,micro", [(1, 1, 4), (2, 2, 2), (3, 1, 3), (4, 3, 1)])
def test_plan_mix_buckets_and_epochs(two_sources, world, accum, micro):
    """Each global batch: exact replay count; each micro-batch: one bucket; each (source, bucket) epoch: a permutation."""
    target_dir, replay_dir, keys = two_sources
    cat = build_catalog([SourceSpec("target", str(target_dir)), SourceSpec("replay", str(replay_dir))])
    planner = MixPlanner(cat, {"target": 0.7, "replay": 0.3}, micro, accum, world, seed=3)
    B = world * accum * micro
    carry, draws = [0.0, 0.0], {}
    for _ in range(40):
        plans = planner.next_global_batch()
        assert len(plans) == world * accum and [p.index for p in plans] == list(range(world * accum))
        (_, n_replay), carry = split_counts([0.7, 0.3], carry, B)
        assert sum(s == 1 for p in plans for s, *_ in p.samples) == n_replay
        for p in plans:
            assert len(p.samples) == micro
            for source, sample_id, _epoch, _pos in p.samples:
                entry = cat.entry(sample_id)
                assert tuple(entry["bucket"]) == p.bucket and entry["source"] == source
                draws.setdefault((source, p.bucket), []).append(sample_id)
    for (source, bucket), seq in draws.items():
        pool = sorted(cat.by_bucket[source][bucket])
        for start in range(0, len(seq), len(pool)):
            epoch = seq[start : start + len(pool)]
            assert len(set(epoch)) == len(epoch) and set(epoch) <= set(pool)
            if len(epoch) == len(pool):
                assert sorted(epoch) == pool


def test_bucket_frequencies_follow_pooled_sizes(two_sources):
    """Bucket choice is independent of the chunk's sources: frequencies match the pooled bucket sizes."""
    target_dir, replay_dir, _ = two_sources
    cat = build_catalog([SourceSpec("target", str(target_dir)), SourceSpec("replay", str(replay_dir))])
    planner = MixPlanner(cat, {"target": 1.0, "replay": 0.0}, 1, 1, 1, seed=0)
    counts = Counter(planner.next_global_batch()[0].bucket for _ in range(3000))
    pooled = {b: len(ids) for b, ids in cat.by_bucket[0].items()}  # replay has weight 0: only target counts
    for bucket, n in pooled.items():
        assert abs(counts[bucket] / 3000 - n / sum(pooled.values())) < 0.04


def test_bad_weights_are_named(two_sources):
    target_dir, replay_dir, _ = two_sources
    cat = build_catalog([SourceSpec("target", str(target_dir)), SourceSpec("replay", str(replay_dir))])
    with pytest.raises(ValueError, match="unknown sources"):
        MixPlanner(cat, {"target": 1.0, "extra": 1.0}, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="sum > 0"):
        MixPlanner(cat, {"target": 0.0}, 1, 1, 1, 0)


def test_mix_holds_within_every_bucket(tmp_path):
    """Sources with the same buckets: over time each bucket's replay share converges to the global share."""
    from shard_factory import write_source

    buckets = [(64, 64), (96, 48), (48, 96)]
    write_source(tmp_path / "t", "target", buckets, num_shards=2, per_shard=12)
    write_source(tmp_path / "r", "replay", buckets[::-1], num_shards=1, per_shard=9)
    cat = build_catalog([SourceSpec("target", str(tmp_path / "t")), SourceSpec("replay", str(tmp_path / "r"))])
    planner = MixPlanner(cat, {"target": 0.7, "replay": 0.3}, micro_batch_size=3, grad_accum_steps=1, world_size=2,
                         seed=9)
    per_bucket = {b: Counter() for b in buckets}
    for _ in range(1500):
        for plan in planner.next_global_batch():
            per_bucket[plan.bucket].update(s for s, *_ in plan.samples)
    for bucket, counts in per_bucket.items():
        share = counts[1] / (counts[0] + counts[1])
        assert abs(share - 0.3) < 0.02, f"bucket {bucket}: replay share {share:.3f}"


def test_materializing_a_subset_gives_the_same_plans_and_state(two_sources):
    """What a rank computes (only its own micro-batches) equals the full plan, and the states stay equal."""
    target_dir, replay_dir, _ = two_sources
    cat = build_catalog([SourceSpec("target", str(target_dir)), SourceSpec("replay", str(replay_dir))])
    full = MixPlanner(cat, {"target": 0.6, "replay": 0.4}, 3, 2, 4, seed=1, caption_dropout=0.5)
    part = MixPlanner(cat, {"target": 0.6, "replay": 0.4}, 3, 2, 4, seed=1, caption_dropout=0.5)
    for step in range(25):
        mine = [a * 4 + step % 4 for a in range(2)]
        want, got = full.next_global_batch(), part.next_global_batch(materialize=mine)
        assert [got[j] for j in mine] == [want[j] for j in mine]
        assert all(got[j] is None for j in range(8) if j not in mine)
        assert part.state_dict() == full.state_dict()
