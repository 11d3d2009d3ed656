"""A worker's batch hand-over (``worker_transport``): through a ring of shared slots, every interleaving of sends and
receives gives back each batch, bit for bit, for any mix of dtypes, shapes and strides; a full ring waits, then
fails by name; through real DataLoader workers each ring crosses once and every batch equals the in-process one,
owning one buffer."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.worker_transport import ALIGN, RING_BUFFER, RingReceiver, RingSender

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


def _assert_same_batch(got: dict, want: dict) -> None:
    """``got`` is ``want``: same keys in order, equal values, tensors with the same dtypes, shapes and bits, each
    contiguous and aligned in one buffer that the batch owns (no view of a ring)."""
    assert list(got) == list(want)
    storages = set()
    for key, value in want.items():
        if not isinstance(value, torch.Tensor):
            assert got[key] == value, key
            continue
        t = got[key]
        assert (t.dtype, t.shape, t.is_contiguous()) == (value.dtype, value.shape, True), key
        assert _bits(t) == _bits(value), key
        assert t.storage_offset() * t.element_size() % ALIGN == 0
        storages.add(t.untyped_storage().data_ptr())
    assert len(storages) <= 1


batches = st.lists(st.one_of(tensors(), st.text(max_size=3), st.lists(st.integers(), max_size=3), st.none()),
                   max_size=6).map(lambda values: {f"k{i}": v for i, v in enumerate(values)})


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(batches, st.integers(0, 3)), min_size=1, max_size=12), st.integers(1, 4))
def test_every_interleaving_of_sends_and_receives_gives_back_each_batch(steps, slots):
    """A model of the hand-over: batches of any size sent while up to ``slots`` are still unreceived (rings made
    anew, larger, while batches of the old ones wait), received in order: each is the batch sent, never a slot
    overwritten before it was copied out; the ring crosses only with the first batch that uses it."""
    sender, receiver, queue, sent = RingSender(slots=slots, wait_s=1.0), RingReceiver(), [], []
    received = []
    for batch, receive_now in steps:
        while len(queue) >= slots:  # a full ring: the receiver must free a slot first (the DataLoader's bound)
            received.append(receiver.receive(queue.pop(0)))
        generation = sender.generation
        message = sender.send(batch)
        assert [k for k, v in message.items() if isinstance(v, torch.Tensor)] == (
            [RING_BUFFER] if sender.generation != generation else [])
        queue.append(message)
        sent.append(batch)
        for _ in range(min(receive_now, len(queue))):
            received.append(receiver.receive(queue.pop(0)))
    received += [receiver.receive(m) for m in queue]
    for got, want in zip(received, sent, strict=True):
        _assert_same_batch(got, want)
    assert receiver.rings_received == sender.generation
    assert set(receiver.rings) == {(os.getpid(), sender.generation)}  # older rings are dropped
    assert receiver.receive({"plain": 1}) == {"plain": 1}  # not sent through a ring: as it is


def test_a_full_ring_waits_for_the_receiver_then_fails_by_name():
    sender, receiver = RingSender(slots=2, wait_s=0.05), RingReceiver()
    a, b, c = ({"x": torch.full((4,), float(v))} for v in (1, 2, 3))
    first, second = sender.send(a), sender.send(b)
    with pytest.raises(RuntimeError, match="has not taken batch 0 of this worker for 0 s .*2 hand-over slots"):
        sender.send(c)
    _assert_same_batch(receiver.receive(first), a)
    third = sender.send(c)  # into batch a's slot, now free
    _assert_same_batch(receiver.receive(second), b)
    _assert_same_batch(receiver.receive(third), c)
    with pytest.raises(RuntimeError, match="names hand-over ring 1, which this process never received"):
        RingReceiver().receive(third)


def test_non_strided_tensors_are_refused():
    with pytest.raises(TypeError, match="'sparse'.*strided"):
        RingSender().send({"sparse": torch.eye(3).to_sparse()})


class _Batches(IterableDataset):
    """Batches of a known pattern (a bigger one every 5th: rings made anew in a worker), sent through a ring."""

    def __iter__(self):
        info = get_worker_info()
        sender = RingSender()
        for i in range(info.id, 24, info.num_workers):
            n = 1000 * (1 + (i % 5 == 4) * (i // 5))
            yield sender.send({"i": i, "x": torch.arange(n, dtype=torch.int32) + i, "y": torch.full((3, 2), i / 7)})


@pytest.mark.parametrize("workers", [1, 2])
def test_through_real_workers_each_ring_crosses_once(workers):
    receiver = RingReceiver()
    got = [receiver.receive(m) for m in DataLoader(_Batches(), batch_size=None, num_workers=workers)]
    assert [b["i"] for b in got] == list(range(24))
    for i, batch in enumerate(got):
        n = 1000 * (1 + (i % 5 == 4) * (i // 5))
        _assert_same_batch(batch, {"i": i, "x": torch.arange(n, dtype=torch.int32) + i, "y": torch.full((3, 2), i / 7)})
    assert receiver.rings_received == workers + sum(1 for i in range(24) if i % 5 == 4 and i >= 9)


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
