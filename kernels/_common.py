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


def autotune_configs(gpu_configs: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    """The GPU config list, or one small config under ``TRITON_INTERPRET=1`` (autotuning there is pointless)."""
    return [interpret_config] if INTERPRET else gpu_configs


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
