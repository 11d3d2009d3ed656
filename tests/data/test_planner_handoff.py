"""With ``num_workers=0`` the stream takes its planner state from the in-process ``_RankStream`` (which planned the
global batch already) instead of planning it twice: its ``state_dict()`` after every micro-batch must equal that of
a planner advanced on its own (the reference), through weight changes and a resume."""

from __future__ import annotations

import itertools

import pytest

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.plan import MixPlanner


@pytest.mark.parametrize("micro,accum,world,rank,dropout", [(1, 1, 1, 0, 0.0), (2, 3, 2, 1, 0.3), (1, 2, 3, 2, 0.5)])
def test_state_after_every_micro_batch_equals_an_independent_planner(two_sources, micro, accum, world, rank,
                                                                     dropout):
    target_dir, replay_dir, _ = two_sources
    sources = [SourceSpec("target", str(target_dir), 0.7), SourceSpec("replay", str(replay_dir), 0.3)]
    stream = MixedStream(sources, micro_batch_size=micro, grad_accum_steps=accum, dp_rank=rank, dp_world_size=world,
                         seed=3, caption_dropout=dropout)
    reference = MixPlanner(stream.catalog, {"target": 0.7, "replay": 0.3}, micro, accum, world, seed=3,
                           caption_dropout=dropout)
    def no_second_planning(materialize=None):
        raise AssertionError("the stream planned a global batch its _RankStream had planned already")

    stream._planner.next_global_batch = no_second_planning
    it, consumed = iter(stream), 0
    for n in range(1, 4 * accum * 5 + 1):
        next(it)
        consumed += 1
        if consumed == accum:
            reference.next_global_batch(materialize=())
            consumed = 0
        if n == 2 * accum:  # a weight change at a boundary (the live iterator restarts)
            stream.set_weights({"target": 0.4, "replay": 0.6})
            reference.set_weights({"target": 0.4, "replay": 0.6})
        assert stream.state_dict()["planner"] == reference.state_dict(), n
    del stream._planner.next_global_batch
    saved = stream.state_dict()
    resumed = MixedStream(sources, micro_batch_size=micro, grad_accum_steps=accum, dp_rank=rank, dp_world_size=world,
                          seed=3, caption_dropout=dropout)
    resumed.load_state_dict(saved)
    got = [b["key"] for b in itertools.islice(iter(resumed), 3 * accum)]
    want = [b["key"] for b in itertools.islice(iter(stream), 3 * accum)]
    assert got == want
    assert resumed.state_dict()["planner"] == stream.state_dict()["planner"]
