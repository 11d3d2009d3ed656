"""A worker's batch hand-over (``worker_transport``): pack/unpack give back the same dict, bit for bit, for any mix
of dtypes, shapes and strides; through real DataLoader workers every batch equals the in-process one and arrives as
views of one shared buffer (one storage to send per batch, not one per tensor)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.worker_transport import ALIGN, pack, unpack

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool]


def _bits(t: torch.Tensor) -> bytes:
    """The element bytes of ``t`` in row-major order (NaNs compare by their bits)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8).numpy().tobytes()


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * 8,), generator=g, dtype=torch.uint8)
    t = raw[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)  # any bits, NaNs included
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous
    if t.dim() >= 1 and t.shape[0] > 1 and draw(st.booleans()):
        t = t[::2]
    return t


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(tensors(), st.text(max_size=3), st.lists(st.integers(), max_size=3), st.none()),
                max_size=7), st.booleans())
def test_unpack_of_pack_is_the_same_batch(values, shared):
    batch = {f"k{i}": v for i, v in enumerate(values)}
    packed = pack(batch, shared=shared)
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["_packed"]
    assert packed["_packed"].is_shared() == shared
    got = unpack(packed)
    assert list(got) == list(batch)
    storages = set()
    for key, want in batch.items():
        if not isinstance(want, torch.Tensor):
            assert got[key] == want
            continue
        t = got[key]
        assert (t.dtype, t.shape, t.is_contiguous()) == (want.dtype, want.shape, True), key
        assert _bits(t) == _bits(want), key
        assert (t.untyped_storage().data_ptr() - packed["_packed"].data_ptr()) >= 0
        assert t.storage_offset() * t.element_size() % ALIGN == 0
        storages.add(t.untyped_storage().data_ptr())
    assert len(storages) <= 1
    assert unpack(batch) is batch  # not packed: as it is


def test_non_strided_tensors_are_refused():
    with pytest.raises(TypeError, match="'sparse'.*strided"):
        pack({"sparse": torch.eye(3).to_sparse()})


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_batches_equal_the_in_process_ones_and_share_one_buffer(two_sources, workers):
    target, replay, _ = two_sources

    def stream(n):
        return MixedStream([SourceSpec("target", str(target), 0.7), SourceSpec("replay", str(replay), 0.3)],
                           micro_batch_size=3, num_workers=n, seed=3, caption_dropout=0.3)

    ref = list(itertools.islice(iter(stream(0)), 10))
    got = list(itertools.islice(iter(stream(workers)), 10))
    for want, batch in zip(ref, got, strict=True):
        assert list(batch) == list(want)
        tensors_ = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
        assert len(tensors_) == 6
        for key in want:
            if key in tensors_:
                assert batch[key].dtype == want[key].dtype and torch.equal(batch[key], want[key]), key
            else:
                assert batch[key] == want[key], key
        assert len({batch[k].untyped_storage().data_ptr() for k in tensors_}) == 1
