"""The synthetic stream (train/batches.py): global-batch partition, resume, layout change."""

from __future__ import annotations

import pytest

from anima_ft.train.batches import SyntheticStream


def test_synthetic_stream_partitions_global_batches_and_resumes():
    def keys(rank, n, start=None):
        s = SyntheticStream(64, 4, 3, 5, micro_batch_size=2, grad_accum_steps=2, dp_rank=rank, dp_world_size=2,
                            seed=0)
        if start is not None:
            s.load_state_dict(start)
        it = iter(s)
        return [k for _ in range(n) for k in next(it)["key"]], s

    r0, s0 = keys(0, 4)
    r1, _ = keys(1, 4)
    assert len(set(r0) | set(r1)) == 16  # two global batches of 8, disjoint across ranks
    resumed, _ = keys(0, 2, start={"consumed": 2})  # a state written before the layout was stored
    assert resumed == r0[4:]
    assert s0.state_dict() == {"consumed": 4, "start": 0,
                               "layout": {"micro_batch_size": 2, "grad_accum_steps": 2, "world_size": 2, "dp_rank": 0}}


def _synthetic_global(world: int, accum: int, micro: int, num_global: int, states: list[dict] | None = None):
    """Keys of ``num_global`` global batches over every rank of a layout, in global order (j = a * W + rank)."""
    ranks = [SyntheticStream(64, 4, 3, 5, micro_batch_size=micro, grad_accum_steps=accum, dp_rank=r,
                             dp_world_size=world, seed=0) for r in range(world)]
    for s in ranks:
        if states is not None:
            s.load_state_dicts(states)
    its, keys = [iter(s) for s in ranks], []
    for _ in range(num_global):
        by_j = {a * world + r: next(it)["key"] for a in range(accum) for r, it in enumerate(its)}
        keys += [k for j in sorted(by_j) for k in by_j[j]]
    return keys, [s.state_dict() for s in ranks]


@pytest.mark.parametrize("new", [(1, 2, 2), (3, 1, 1), (2, 3, 2)])
def test_synthetic_stream_continues_on_another_layout(new):
    """A state of 2 ranks x 1 x micro 2, loaded into any (world, accum, micro) layout, continues the same global
    sample sequence; a state taken inside a global batch is refused."""
    full, _ = _synthetic_global(2, 1, 2, 20)
    before, states = _synthetic_global(2, 1, 2, 3)
    after, _ = _synthetic_global(*new, 3, states)
    assert before + after == full[: len(before) + len(after)]
    inside = SyntheticStream(64, 4, 3, 5, micro_batch_size=2, grad_accum_steps=2, dp_rank=0, dp_world_size=1, seed=0)
    next(iter(inside))
    with pytest.raises(ValueError, match="inside a global batch"):
        _synthetic_global(1, 1, 2, 1, [inside.state_dict()])
