"""Data position across world sizes: the planner state is global, so a state saved by W ranks continues on W' ranks.

Same ``micro_batch_size`` and ``grad_accum_steps x world_size``: the global batches are exactly the uninterrupted
run's. Another global-batch shape: every (source, bucket) stream continues at its cursor (nothing repeated or skipped)
and the mix stays exact. Refused: another seed, a state taken inside a global batch, ranks that disagree.
"""

from __future__ import annotations

import pytest

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.plan import MixPlanner, split_counts
from anima_ft.data.sources import build_catalog

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
WEIGHTS = {"target": 0.7, "replay": 0.3}


def streams(two_sources, world: int, accum: int, micro: int, seed: int = 7) -> list[MixedStream]:
    """One stream per rank of the layout (world, accum, micro)."""
    target_dir, replay_dir, _ = two_sources
    specs = [SourceSpec("target", str(target_dir), WEIGHTS["target"]),
             SourceSpec("replay", str(replay_dir), WEIGHTS["replay"])]
    return [MixedStream(specs, micro_batch_size=micro, grad_accum_steps=accum, dp_rank=r, dp_world_size=world,
                        seed=seed, caption_dropout=0.25) for r in range(world)]


def global_batches(ranks: list[MixedStream], n: int) -> list[list[tuple[str, str]]]:
    """The next ``n`` global batches as (key, caption) in global order: micro-batch j = a * W + rank, then slot."""
    world, accum = len(ranks), ranks[0]._planner.A
    its = [iter(s) for s in ranks]
    out = []
    for _ in range(n):
        by_j = {}
        for r, it in enumerate(its):
            for a in range(accum):
                batch = next(it)
                by_j[a * world + r] = list(zip(batch["key"], batch["caption"]))
        out.append([x for j in sorted(by_j) for x in by_j[j]])
    return out


@pytest.mark.parametrize("old,new", [((2, 1, 2), (1, 2, 2)), ((1, 2, 2), (2, 1, 2)), ((1, 4, 1), (4, 1, 1)),
                                     ((2, 2, 1), (4, 1, 1)), ((3, 2, 2), (2, 3, 2))])
def test_same_global_shape_continues_exactly(two_sources, old, new):
    """(world, accum, micro) -> another split of the same micro-batches: the uninterrupted global batches, dropout
    flags included; per-rank counters are summed onto the new rank 0."""
    full = global_batches(streams(two_sources, *old), 9)
    first = streams(two_sources, *old)
    before = global_batches(first, 4)
    states = [s.state_dict() for s in first]
    resumed = streams(two_sources, *new)
    for s in resumed:
        s.load_state_dicts(states)
    seen = [sum(s.stats()["seen"].values()) for s in resumed]
    assert seen == [sum(len(b) for b in before)] + [0] * (len(resumed) - 1)
    assert before + global_batches(resumed, 5) == full


def test_planner_state_is_layout_free(two_sources):
    """A planner state loaded into another (accum, world) with the same accum x world plans the same micro-batches."""
    target_dir, replay_dir, _ = two_sources
    cat = build_catalog([SourceSpec("target", str(target_dir)), SourceSpec("replay", str(replay_dir))])
    a = MixPlanner(cat, WEIGHTS, 3, grad_accum_steps=1, world_size=4, seed=5, caption_dropout=0.5)
    for _ in range(6):
        a.next_global_batch()
    b = MixPlanner(cat, {"target": 1.0}, 3, grad_accum_steps=2, world_size=2, seed=5, caption_dropout=0.5)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        pa, pb = a.next_global_batch(), b.next_global_batch()
        assert [(p.bucket, p.samples, p.drop) for p in pa] == [(p.bucket, p.samples, p.drop) for p in pb]
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("old,new", [((2, 1, 2), (3, 1, 3)), ((2, 2, 1), (1, 1, 1)), ((1, 1, 4), (2, 2, 2))])
def test_other_global_shape_repeats_and_skips_nothing(two_sources, old, new):
    """Another micro_batch_size or accum x world: each (source, bucket) pair keeps drawing its seeded per-epoch
    orders where it stopped, and every global batch holds the replay count of the carried-error rule."""
    first = streams(two_sources, *old)
    drawn = global_batches(first, 5)
    resumed = streams(two_sources, *new)
    for s in resumed:
        s.load_state_dicts([s0.state_dict() for s0 in first])
    after = global_batches(resumed, 12)
    cat, planner = resumed[0].catalog, resumed[0]._planner
    carry = first[0]._planner.carry
    for batch in after:
        (_, n_replay), carry = split_counts([0.7, 0.3], carry, new[0] * new[1] * new[2])
        assert sum(k.startswith("replay") for k, _ in batch) == n_replay
    ids = {k: i for i, k in enumerate(cat.keys)}
    pair_of = {i: (s, b) for s, per in enumerate(cat.by_bucket) for b, members in per.items() for i in members}
    per_pair: dict = {}
    for key, _ in (x for batch in drawn + after for x in batch):  # global order = each pair's draw order
        per_pair.setdefault(pair_of[ids[key]], []).append(ids[key])
    for (s, bucket), got in per_pair.items():
        n = len(cat.by_bucket[s][bucket])
        want = [int(i) for e in range(len(got) // n + 1) for i in planner.order(s, bucket, e)][: len(got)]
        assert got == want, f"{cat.names[s]} {bucket}: a sample was repeated or skipped across the layout change"


def test_layout_change_refusals(two_sources):
    first = streams(two_sources, 2, 2, 1)
    global_batches(first, 2)
    states = [s.state_dict() for s in first]
    with pytest.raises(ValueError, match="run.seed=7, now 8"):
        streams(two_sources, 1, 4, 1, seed=8)[0].load_state_dicts(states)
    bad = [states[0], {**states[1], "planner": {**states[1]["planner"], "step": 99}}]
    with pytest.raises(ValueError, match="rank 1's data-stream position differs"):
        streams(two_sources, 1, 4, 1)[0].load_state_dicts(bad)
    next(iter(first[0]))  # micro-batch 0 of global batch 2: inside a global batch
    with pytest.raises(ValueError, match="inside a global batch"):
        streams(two_sources, 1, 4, 1)[0].load_state_dicts([first[0].state_dict()])
    same = streams(two_sources, 2, 2, 1)[0]  # the saved layout still resumes mid global batch
    same.load_state_dict(first[0].state_dict())
    assert same.stats()["micro_step"] == 1
