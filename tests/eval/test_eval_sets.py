"""Eval sets: shards written by the data package read back exactly; conditions follow the batch contract."""

from __future__ import annotations

import torch
from eval_helpers import make_samples

from anima_ft.eval.eval_sets import collate_condition, load_shard_eval_set


def write_shard(path, samples):
    """Write EvalSamples as one `anima-ft prepare` shard (bf16 latents/states, as prepare stores them)."""
    from anima_ft.data import EncodedSample, ShardWriter, make_fingerprint

    with ShardWriter(path, make_fingerprint({"vae": "test"}, {"text": "test"})) as w:
        for s in samples:
            h, wd = s.latents.shape[1:]
            w.add(EncodedSample(s.key, s.latents, s.qwen_states, s.t5_ids,
                                {"caption": s.caption, "bucket": [wd * 8, h * 8]}))
        w.commit()


def test_shards_round_trip(tmp_path):
    samples = make_samples("s", 3, seed=4)
    write_shard(tmp_path / "b-0001.tar", samples[2:])
    write_shard(tmp_path / "a-0000.tar", samples[:2])
    loaded = load_shard_eval_set(tmp_path, name="replay")
    assert [s.key for s in loaded] == ["s0", "s1", "s2"]
    for got, ref in zip(loaded, samples):
        torch.testing.assert_close(got.latents, ref.latents.bfloat16().float(), rtol=0, atol=0)
        torch.testing.assert_close(got.qwen_states, ref.qwen_states.bfloat16().float(), rtol=0, atol=0)
        assert torch.equal(got.t5_ids, ref.t5_ids) and got.caption == ref.caption
    assert [s.key for s in load_shard_eval_set(tmp_path, limit=2)] == ["s0", "s1"]


def test_collate_condition_contract():
    s = make_samples(n=2)
    c = collate_condition(s[0], "cpu", torch.float32)
    assert c["qwen_states"].shape == (1, 3, 32) and c["qwen_mask"].all() and c["t5_mask"].dtype == torch.bool
    empty = collate_condition(s[1], "cpu", torch.float32)  # the last sample has an empty caption
    assert empty["qwen_states"].abs().sum() == 0 and not empty["qwen_mask"].any()
    assert empty["t5_ids"].tolist() == [[1]] and empty["t5_mask"].tolist() == [[True]]
