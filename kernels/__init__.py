"""Fused kernels for the Anima hot path (Triton) beside their plain-PyTorch references (kernels/reference.py).

The repository folder ``kernels/`` installs as the import package ``anima_kernels`` (a top-level ``kernels`` would
clash with Hugging Face's ``kernels`` package, which diffusers and transformers use). Importing it never imports
Triton: the kernel modules (``anima_kernels.attention``, ``anima_kernels.adaln``) load lazily, so CPU-only machines
without Triton can import ``anima_kernels`` and use ``anima_kernels.reference``.

Public entry points (same arguments and semantics as the functions of the same name in ``anima_kernels.reference``)::

    anima_kernels.qk_norm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, *, rope_q, rope_k, key_mask_B_Lk, eps)
    anima_kernels.modulated_layer_norm(x, shift, scale, eps)
    anima_kernels.gated_residual_modulated_layer_norm(x, gate, y, shift, scale, eps)

Each resolves on first use to the Triton implementation; call :func:`triton_available` first.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

__all__ = [
    "gated_residual_modulated_layer_norm",
    "get_adaln",
    "get_attention",
    "modulated_layer_norm",
    "qk_norm_rope_attention",
    "triton_available",
    "warn_once",
]

_warned: set[str] = set()


def warn_once(msg: str) -> None:
    """Log ``msg`` as a warning the first time it is seen (fallbacks must never be silent, nor spam the log)."""
    if msg not in _warned:
        _warned.add(msg)
        logging.getLogger(__name__).warning(msg)

_LAZY = {
    "qk_norm_rope_attention": ".attention",
    "modulated_layer_norm": ".adaln",
    "gated_residual_modulated_layer_norm": ".adaln",
}


def triton_available() -> bool:
    """True when Triton is importable and can run here: a CUDA GPU is present, or ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except Exception:  # missing, or broken (e.g. no compiler backend): either way the kernels cannot run
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install reads as "no GPU"
        return False


def get_attention():
    """The Triton ``qk_norm_rope_attention`` (imports Triton; raises ``ImportError`` when it is missing)."""
    return importlib.import_module(".attention", __name__).qk_norm_rope_attention


def get_adaln() -> tuple[Any, Any]:
    """The Triton ``(modulated_layer_norm, gated_residual_modulated_layer_norm)`` pair (imports Triton)."""
    mod = importlib.import_module(".adaln", __name__)
    return mod.modulated_layer_norm, mod.gated_residual_modulated_layer_norm


def __getattr__(name: str) -> Any:
    """Lazy access to the Triton entry points listed in ``_LAZY`` (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'anima_kernels' has no attribute {name!r}")
