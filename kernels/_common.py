"""Shared helpers for the Triton kernels: interpreter detection, launch configs, input checks.

Imported only by the kernel modules (which need triton); ``kernels/__init__.py`` must not import this at module load.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton's dot needs every matrix dim >= 16, so tiny head dims are padded up to this.
MIN_DOT_DIM = 16


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= ``max(n, minimum)`` (Triton block shapes must be powers of two)."""
    return max(triton.next_power_of_2(int(n)), minimum)


def tuning_configs(specs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples as Triton configs; only the first one when
    ``ANIMA_KERNELS_AUTOTUNE=0`` (quick runs: one compile per kernel variant, no benchmarking)."""
    if os.environ.get("ANIMA_KERNELS_AUTOTUNE", "1") == "0":
        specs = specs[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]


def maybe_autotune(configs: list[triton.Config], key: list[str]):
    """``triton.autotune(configs, key)`` on a GPU; the identity under ``TRITON_INTERPRET=1``.

    Interpreted launches pass their block sizes explicitly (see :func:`interpret_block`), since benchmarking
    configs in the interpreter is meaningless and slow.
    """
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def interpret_block(n: int) -> int:
    """Interpreter tile size for a length-``n`` axis: 16 for short test sequences (several tiles, so tile edges are
    exercised), 128 beyond 64 (the interpreter's cost is per operation, so fewer, larger tiles run much faster)."""
    return 16 if n <= 64 else 128


def check_device(*tensors: torch.Tensor) -> None:
    """Raise ``RuntimeError`` unless every tensor can be handed to a Triton kernel here.

    Kernels run on CUDA tensors, or on CPU tensors under the interpreter (``TRITON_INTERPRET=1``).
    """
    for t in tensors:
        if t is None:
            continue
        if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got a tensor on {t.device}); set TRITON_INTERPRET=1 before "
                "importing kernels to run them on CPU, or select the 'reference' / 'sdpa' attention backend"
            )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim has stride 1 (any other strides are passed to kernels), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
