"""How a DataLoader worker hands a batch to the training process: a ring of shared-memory slots set up once.

torch sends each tensor's storage from a worker to the main process as a new shared-memory segment, and with the
default ``file_descriptor`` strategy each segment's descriptor travels over a new authenticated connection to the
worker's resource sharer (a thread that needs the worker's GIL). A batch-contract dict holds six tensors
(``mixer.py``): six segments made, mapped, faulted in and handed over per batch.

Here each worker owns one :class:`RingSender`: a shared buffer of ``SLOTS`` slots, made once (and again, larger,
when a batch outgrows its slots). It copies every tensor of a batch into the next slot (:func:`pack_into`) and
sends only the slot's place and the batch's layout; the ring's buffer itself crosses once, with the first batch
that uses it. The main process's :class:`RingReceiver` copies the slot into a buffer of its own, so the batch it
returns owns its memory (the worker can reuse the slot at once), its tensors contiguous views of that one buffer
with the same dtypes, shapes and bits (:func:`unpack_from`), and then marks the slot free in the ring's header.

A slot is written only once the receiver has freed the batch it held. A DataLoader keeps at most
``prefetch_factor`` (2) batches per worker in flight, and asks a worker for a new one when it returns a batch,
just before the receiver frees it, so ``SLOTS = prefetch_factor + 2`` is never waited for; the wait is kept as
the guard, with a deadline (a clear error, not a hang, if the training process stops freeing slots). Measured
before and after: docs/data.md#dataloader-workers.
"""

from __future__ import annotations

import math
import os
import time

import torch

RING = "_ring"  # in a sent batch: (ring key, sequence number, byte offset of the slot, bytes used, layout)
RING_BUFFER = "_ring_buffer"  # in the first batch sent through a ring: the ring's shared buffer itself
ALIGN = 64  # every tensor starts at a multiple of this (any element size divides it); so does every slot
SLOTS = 4  # DataLoader's default prefetch_factor (2) + 2: see the module docstring
WAIT_S = 120.0  # how long a worker waits for a free slot before it fails


def layout_of(batch: dict) -> tuple[list, int]:
    """``(layout, bytes)`` of the packed form of ``batch``: for every key in order, ``(key, None)`` for a value
    that is not a tensor, ``(key, (dtype, shape, byte offset))`` for a tensor (top-level values only)."""
    layout, offset = [], 0
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor):
            layout.append((key, None))
            continue
        if v.layout != torch.strided:
            raise TypeError(f"batch tensor {key!r} has layout {v.layout}; only strided tensors are packed")
        layout.append((key, (v.dtype, tuple(v.shape), offset)))
        offset += -(-v.numel() * v.element_size() // ALIGN) * ALIGN
    return layout, offset


def pack_into(batch: dict, layout: list, buf: torch.Tensor) -> None:
    """Copy the tensors of ``batch`` into the uint8 tensor ``buf`` at the places ``layout`` gives, contiguous and
    row-major."""
    for key, where in layout:
        if where is not None:
            _view(buf, *where).copy_(batch[key])


def unpack_from(buf: torch.Tensor, layout: list, values: dict) -> dict:
    """The batch of ``layout``: its tensors views of ``buf`` (no copy), its other values taken from ``values``."""
    return {key: values[key] if where is None else _view(buf, *where) for key, where in layout}


def _view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], start: int) -> torch.Tensor:
    """The contiguous tensor of ``dtype`` and ``shape`` at byte ``start`` of ``buf``, a view of it."""
    return buf[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def _shared_bytes(n: int) -> torch.Tensor:
    """A uint8 tensor of ``n`` bytes in shared memory (torch's current sharing strategy), its pages touched now (a
    shared-memory limit shows here, not in the middle of a run)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # not in every torch: allocate, then move
        return torch.zeros(n, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(n)).zero_()


def _released(ring: torch.Tensor) -> torch.Tensor:
    """The ring's header: how many of its batches (in sequence order) the receiver has copied out."""
    return ring[:8].view(torch.int64)


class RingSender:
    """One worker's side: ``send(batch)`` -> the small dict to hand over instead of ``batch`` (module docstring)."""

    def __init__(self, slots: int = SLOTS, wait_s: float = WAIT_S):
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        self.slots, self.wait_s = slots, wait_s
        self.ring: torch.Tensor | None = None
        self.slot_bytes = 0
        self.generation = 0  # rings made so far by this sender
        self._seq = 0  # batches sent through the current ring

    def send(self, batch: dict) -> dict:
        """Copy ``batch``'s tensors into the next free slot; returns its other values plus where to find them."""
        layout, nbytes = layout_of(batch)
        out = {key: batch[key] for key, where in layout if where is None}
        if self.ring is None or nbytes > self.slot_bytes:
            self._new_ring(nbytes)
            out[RING_BUFFER] = self.ring
        seq = self._seq
        self._wait_for_slot(seq)
        offset = ALIGN + (seq % self.slots) * self.slot_bytes
        pack_into(batch, layout, self.ring[offset : offset + nbytes])
        out[RING] = ((os.getpid(), self.generation), seq, offset, nbytes, layout)
        self._seq += 1
        return out

    def _new_ring(self, nbytes: int) -> None:
        """A ring whose slots hold ``nbytes`` with a quarter to spare (and at least 1.5x the last one's), so that a
        few larger buckets do not each make a ring."""
        grow = max(nbytes + nbytes // 4, self.slot_bytes * 3 // 2, ALIGN)
        self.slot_bytes = -(-grow // ALIGN) * ALIGN
        self.ring = _shared_bytes(ALIGN + self.slots * self.slot_bytes)
        self.generation += 1
        self._seq = 0

    def _wait_for_slot(self, seq: int) -> None:
        """Until the batch that slot ``seq % slots`` held (``seq - slots``) has been copied out."""
        released, deadline = _released(self.ring), None
        while int(released[0]) < seq - self.slots + 1:
            now = time.monotonic()
            deadline = deadline or now + self.wait_s
            if now > deadline:
                raise RuntimeError(f"DataLoader worker {os.getpid()}: the training process has not taken batch "
                                   f"{seq - self.slots} of this worker for {self.wait_s:.0f} s (all {self.slots} "
                                   "hand-over slots are full); is it still iterating?")
            time.sleep(0.0002)


class RingReceiver:
    """The training process's side, one per DataLoader iterator: ``receive(sent)`` -> the batch given to ``send``.
    A batch that did not come through a ring is returned as it is."""

    def __init__(self):
        self.rings: dict[tuple[int, int], torch.Tensor] = {}  # by (worker pid, generation)
        self.rings_received = 0

    def receive(self, sent: dict) -> dict:
        if RING not in sent:
            return sent
        key, seq, offset, nbytes, layout = sent[RING]
        key = tuple(key)  # the DataLoader's default_convert turns tuples into lists
        if RING_BUFFER in sent:  # a worker's new ring: every batch of its older ones has been received (in order)
            self.rings = {k: v for k, v in self.rings.items() if k[0] != key[0]}
            self.rings[key] = sent[RING_BUFFER]
            self.rings_received += 1
        ring = self.rings.get(key)
        if ring is None:
            raise RuntimeError(f"a batch from DataLoader worker {key[0]} names hand-over ring {key[1]}, which this "
                               "process never received (its batches must reach one RingReceiver, in order)")
        own = torch.empty(nbytes, dtype=torch.uint8)
        own.copy_(ring[offset : offset + nbytes])
        released = _released(ring)
        released[0] = max(int(released[0]), seq + 1)
        return unpack_from(own, layout, sent)
