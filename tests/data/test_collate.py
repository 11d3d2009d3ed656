"""``collate``'s one-sample fast path (views, no padding) against its general path: the same batch-contract dict,
value for value, dtype, shape and contiguity; padded and caption-dropped samples keep the general path."""

from __future__ import annotations

import random

import torch

from anima_ft.data.mixer import T5_EOS, collate

NAMES = ["target", "replay"]


def _sample(rng: random.Random, S: int, L: int) -> dict:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return {"latent": torch.randn(16, 4, 8, generator=g).to(torch.bfloat16),
            "qwen_states": torch.randn(S, 8, generator=g).to(torch.bfloat16),
            "t5_ids": torch.randint(2, 32000, (L,), generator=g, dtype=torch.int32),
            "meta": {"caption": f"c{S}x{L}"}, "key": f"k{S}_{L}"}


def _assert_batch_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            g = got[k]
            assert (g.dtype, g.shape, g.is_contiguous()) == (v.dtype, v.shape, v.is_contiguous()), k
            assert torch.equal(g, v), k
        else:
            assert got[k] == v, k


def test_single_sample_fast_path_equals_the_general_path():
    rng = random.Random(7)
    for _ in range(50):
        sample = _sample(rng, rng.randint(1, 6), rng.randint(1, 5))
        source = rng.randrange(2)
        got = collate([sample], [False], [source], NAMES)
        # two copies of one sample need no padding, so the general path's first row is the reference
        pair = collate([sample, sample], [False, False], [source, source], NAMES)
        want = {k: (v[:1].contiguous() if isinstance(v, torch.Tensor) else v[:1]) for k, v in pair.items()}
        _assert_batch_equal(got, want)
        assert got["latents"].data_ptr() == sample["latent"].data_ptr()  # a view, not a copy


def test_dropped_or_empty_single_sample_keeps_the_empty_caption_convention():
    rng = random.Random(8)
    dropped = collate([_sample(rng, 3, 2)], [True], [0], NAMES)
    assert dropped["qwen_states"].shape == (1, 1, 8) and not dropped["qwen_mask"].any()
    assert dropped["qwen_states"].abs().sum() == 0
    assert dropped["t5_ids"].tolist() == [[T5_EOS]] and dropped["t5_mask"].tolist() == [[True]]
    assert dropped["caption"] == [""]
    empty = collate([_sample(rng, 0, 2)], [False], [1], NAMES)  # no Qwen tokens: padded to one zero row
    assert empty["qwen_states"].shape == (1, 1, 8) and empty["qwen_mask"].tolist() == [[False]]
