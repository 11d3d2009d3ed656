"""MixedStream: batch contents, partition across ranks and workers, exact mix, exact resume, reweighting."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shard_factory import expected_sample

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.plan import split_counts

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def make_stream(two_sources, **kw) -> MixedStream:
    target_dir, replay_dir, _ = two_sources
    args = {"micro_batch_size": 2, "grad_accum_steps": 1, "dp_rank": 0, "dp_world_size": 1, "num_workers": 0,
            "seed": 0, "caption_dropout": 0.0}
    args.update(kw)
    weights = args.pop("weights", (0.7, 0.3))
    return MixedStream([SourceSpec("target", str(target_dir), weights[0]),
                        SourceSpec("replay", str(replay_dir), weights[1])], **args)


def take(stream: MixedStream, n: int) -> list[dict]:
    return list(itertools.islice(iter(stream), n))


def test_batch_matches_stored_tensors_and_dropout_convention(two_sources):
    """Every field against the tensors the factory wrote; dropped captions follow spec section 5."""
    keys = two_sources[2]
    stream = make_stream(two_sources, micro_batch_size=3, caption_dropout=0.4, seed=5)
    num_dropped = 0
    for batch in take(stream, 12):
        B, S, L = len(batch["key"]), batch["qwen_mask"].shape[1], batch["t5_mask"].shape[1]
        assert batch["latents"].shape[:2] == (B, 16) and batch["latents"].dtype == torch.bfloat16
        assert batch["t5_ids"].dtype == torch.long and batch["qwen_mask"].dtype == torch.bool
        assert len({keys[k] for k in batch["key"]}) == 1  # one bucket per micro-batch
        for b, key in enumerate(batch["key"]):
            ref = expected_sample(key, keys[key])
            assert batch["source"][b] == key.split("_")[0]
            assert batch["source_id"][b] == ["target", "replay"].index(batch["source"][b])
            assert torch.equal(batch["latents"][b], ref["latent"])
            if batch["caption"][b] == "":  # dropped: zero Qwen states, mask all False; T5 [1, 0..] mask [1, 0..]
                num_dropped += 1
                assert not batch["qwen_mask"][b].any() and not batch["qwen_states"][b].any()
                assert batch["t5_ids"][b].tolist() == [1] + [0] * (L - 1)
                assert batch["t5_mask"][b].tolist() == [True] + [False] * (L - 1)
                continue
            s, n = ref["qwen_states"].shape[0], ref["t5_ids"].shape[0]
            assert batch["caption"][b] == ref["caption"]
            assert torch.equal(batch["qwen_states"][b, :s], ref["qwen_states"])
            assert not batch["qwen_states"][b, s:].any() and batch["qwen_mask"][b].tolist() == [True] * s + [False] * (S - s)
            assert batch["t5_ids"][b].tolist() == ref["t5_ids"].tolist() + [0] * (L - n)
            assert batch["t5_mask"][b].tolist() == [True] * n + [False] * (L - n)
    assert 0 < num_dropped < 36


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partition_and_mix_for_every_world_and_worker_count(two_sources, world):
    """Workers 0-3 give the same per-rank sequence; ranks together cover every (source, bucket) epoch exactly once
    (no overlap, full coverage); each global batch holds exactly the planned replay count."""
    keys, accum, micro, steps = two_sources[2], 2, 2, 9
    per_rank = {}
    for rank in range(world):
        ref = None
        for workers in range(4):
            stream = make_stream(two_sources, dp_rank=rank, dp_world_size=world, grad_accum_steps=accum,
                                 micro_batch_size=micro, num_workers=workers, seed=11)
            got = [b["key"] for b in take(stream, steps * accum)]
            if ref is None:
                ref = got
            assert got == ref, f"rank {rank}: {workers} workers changed the sample sequence"
        per_rank[rank] = ref
    carry, draws = [0.0, 0.0], {}
    for g in range(steps):
        batch_keys = [k for a in range(accum) for r in range(world) for k in per_rank[r][g * accum + a]]
        (_, n_replay), carry = split_counts([0.7, 0.3], carry, world * accum * micro)
        assert sum(k.startswith("replay") for k in batch_keys) == n_replay
        for k in batch_keys:
            draws.setdefault((k.split("_")[0], keys[k]), []).append(k)
    for (source, bucket), seq in draws.items():
        pool = sorted(k for k, b in keys.items() if b == bucket and k.startswith(source))
        for start in range(0, len(seq), len(pool)):
            epoch = seq[start : start + len(pool)]
            assert len(set(epoch)) == len(epoch), f"{source} {bucket}: a sample repeats within an epoch"
            assert len(epoch) < len(pool) or sorted(epoch) == pool, f"{source} {bucket}: an epoch missed samples"


@pytest.mark.parametrize("stop,workers", [(0, 0), (1, 0), (4, 2), (7, 0), (11, 3)])
def test_resume_yields_exactly_the_uninterrupted_batches(two_sources, stop, workers):
    """Save after `stop` micro-batches (mid global batch too: accum 3), reload in a fresh stream: same batches."""
    kw = {"grad_accum_steps": 3, "caption_dropout": 0.3, "seed": 2, "dp_world_size": 2, "dp_rank": 1}
    full = take(make_stream(two_sources, **kw), stop + 8)
    first = make_stream(two_sources, **kw)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    resumed = make_stream(two_sources, num_workers=workers, **kw)
    resumed.load_state_dict(state)
    for want, got in zip(full[stop:], take(resumed, 8)):
        assert got["key"] == want["key"] and got["caption"] == want["caption"]
        assert torch.equal(got["latents"], want["latents"]) and torch.equal(got["t5_ids"], want["t5_ids"])


def test_set_weights_applies_at_next_global_batch_and_resumes(two_sources):
    """A weight change mid global batch waits for the boundary; a state saved in between carries it."""
    kw = {"grad_accum_steps": 2, "micro_batch_size": 2, "seed": 4}
    stream = make_stream(two_sources, **kw)
    it = iter(stream)
    before = [next(it) for _ in range(3)]  # global batch 0, then micro 0 of global batch 1
    stream.set_weights({"target": 1.0, "replay": 0.0})
    state = stream.state_dict()
    assert state["pending_weights"] == {"target": 1.0, "replay": 0.0}
    rest = [next(it) for _ in range(6)]
    old_mix = [k for b in before for k in b["key"]]
    assert sum(k.startswith("replay") for k in old_mix[:4]) == 1  # round(0.3 * 4)
    assert all(k.startswith("target") for b in rest[1:] for k in b["key"])  # from global batch 2 on
    resumed = make_stream(two_sources, **kw)
    resumed.load_state_dict(state)
    assert [b["key"] for b in take(resumed, 6)] == [b["key"] for b in rest]
    assert stream.stats()["seen"] == {"target": sum(k.startswith("target") for b in before + rest for k in b["key"]),
                                      "replay": sum(k.startswith("replay") for b in before + rest for k in b["key"])}


def test_weight_change_at_boundary_discards_prefetched_batches(two_sources):
    """With workers prefetching, a change between global batches takes effect for the very next batch."""
    stream = make_stream(two_sources, num_workers=2, micro_batch_size=4, weights=(0.5, 0.5))
    it = iter(stream)
    first = next(it)
    assert sum(k.startswith("replay") for k in first["key"]) == 2
    stream.set_weights({"target": 0.0, "replay": 1.0})
    assert all(k.startswith("replay") for _ in range(3) for k in next(it)["key"])


def test_fingerprint_mismatch_is_refused(two_sources, tmp_path):
    from shard_factory import write_source

    from anima_ft.data.shard_format import make_fingerprint

    write_source(tmp_path / "other", "other", [(64, 64)], 1, 2, fingerprint=make_fingerprint("vae-2", "text"))
    with pytest.raises(ValueError, match="different encoder settings"):
        MixedStream([SourceSpec("target", str(two_sources[0])), SourceSpec("other", str(tmp_path / "other"))], 1)
    with pytest.raises(ValueError, match="expected_fingerprint"):
        MixedStream([SourceSpec("target", str(two_sources[0]))], 1, expected_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="no .tar shards"):
        MixedStream([SourceSpec("target", str(tmp_path / "missing"))], 1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(1, 4), accum=st.integers(1, 3), micro=st.integers(1, 3), stop=st.integers(0, 20),
       seed=st.integers(0, 2**31), replay=st.sampled_from([0.0, 0.2, 0.25, 0.5, 1 / 3]), data=st.data())
def test_resume_at_arbitrary_steps(two_sources, world, accum, micro, stop, seed, replay, data):
    """Any layout, any stop point (mid global batch included): the resumed keys and dropout equal the reference."""
    rank = data.draw(st.integers(0, world - 1))
    kw = {"dp_world_size": world, "dp_rank": rank, "grad_accum_steps": accum, "micro_batch_size": micro,
          "seed": seed, "caption_dropout": 0.25, "weights": (1 - replay, replay)}
    full = [(b["key"], b["caption"]) for b in take(make_stream(two_sources, **kw), stop + 5)]
    first = make_stream(two_sources, **kw)
    take(first, stop)
    resumed = make_stream(two_sources, **kw)
    resumed.load_state_dict(first.state_dict())
    assert [(b["key"], b["caption"]) for b in take(resumed, 5)] == full[stop:]
