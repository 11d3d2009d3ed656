"""How a DataLoader worker hands a batch to the training process: every tensor of the batch in one buffer.

torch sends each tensor's storage from a worker to the main process as its own shared-memory segment, and with the
default ``file_descriptor`` strategy each segment's descriptor travels over a new authenticated connection to the
worker's resource sharer. A batch-contract dict holds six tensors (``mixer.py``), so a batch cost six such
hand-overs: 3.3-4.1 ms of the training process's CPU per 1024-px batch of one sample on a 2-core VM, 1.7-2.4 ms with
one buffer (docs/data.md#dataloader-workers). :func:`pack` copies the batch's tensors into one byte buffer in the
worker; :func:`unpack` turns it back into the same dict in the main process, each tensor a contiguous view of that
buffer with the same dtype, shape and bits.
"""

from __future__ import annotations

import math

import torch

PACKED = "_packed"  # the key of the buffer in a packed batch
LAYOUT = "_packed_layout"  # every key of the batch in order: (key, None) or (key, (dtype, shape, byte offset))
ALIGN = 64  # every tensor starts at a multiple of this (any element size divides it)


def pack(batch: dict, shared: bool = False) -> dict:
    """``batch`` with its tensors (top-level values) copied, contiguous and row-major, into one uint8 buffer; the
    other values are kept as they are. ``shared``: the buffer is made in shared memory, so that sending it to
    another process does not copy it once more (a DataLoader worker's case)."""
    layout, offset = [], 0
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor):
            layout.append((key, None))
            continue
        if v.layout != torch.strided:
            raise TypeError(f"batch tensor {key!r} has layout {v.layout}; only strided tensors are packed")
        layout.append((key, (v.dtype, tuple(v.shape), offset)))
        offset += -(-v.numel() * v.element_size() // ALIGN) * ALIGN
    buf = _shared_bytes(offset) if shared else torch.empty(offset, dtype=torch.uint8)
    for key, where in layout:
        if where is not None:
            _view(buf, *where).copy_(batch[key])
    out = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
    out[PACKED], out[LAYOUT] = buf, layout
    return out


def _shared_bytes(n: int) -> torch.Tensor:
    """An uninitialized uint8 tensor of ``n`` bytes in shared memory (torch's current sharing strategy)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # not in every torch: allocate, then move (one copy of uninitialized bytes)
        return torch.empty(n, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(n))


def unpack(batch: dict) -> dict:
    """The batch :func:`pack` was given, in its key order, its tensors views of the packed buffer (no copy); a batch
    that was not packed is returned as it is."""
    if PACKED not in batch:
        return batch
    buf = batch[PACKED]
    return {key: batch[key] if where is None else _view(buf, *where) for key, where in batch[LAYOUT]}


def _view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], start: int) -> torch.Tensor:
    """The contiguous tensor of ``dtype`` and ``shape`` at byte ``start`` of ``buf``, a view of it."""
    return buf[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
