"""Shared layers and the one place attention and adaLN glue are dispatched to an implementation.

Backends (chosen per model with ``Anima.set_attention_backend``):

* ``sdpa``      plain PyTorch from ``anima_kernels.reference`` with ``F.scaled_dot_product_attention`` (default);
* ``reference`` the same plain PyTorch with explicit fp32 softmax attention (the test oracle);
* ``triton``    the fused kernels in ``kernels/``; falls back to ``sdpa`` with one warning when Triton cannot run
                (no GPU and no ``TRITON_INTERPRET=1``) or the inputs are outside what the kernels cover.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from anima_kernels import reference, warn_once
from torch import nn

from anima_ft.config.schema import ATTENTION_BACKENDS

BACKENDS = ATTENTION_BACKENDS  # defined once, with the config field that selects them


def _reference_ops(use_sdpa: bool) -> SimpleNamespace:
    def attn(*args, **kwargs):
        return reference.qk_norm_rope_attention(*args, use_sdpa=use_sdpa, **kwargs)

    return SimpleNamespace(
        qk_norm_rope_attention=attn,
        modulated_layer_norm=reference.modulated_layer_norm,
        gated_residual_modulated_layer_norm=reference.gated_residual_modulated_layer_norm,
    )


def _triton_ops() -> SimpleNamespace | None:
    try:
        import anima_kernels

        if not anima_kernels.triton_available():
            warn_once("attention backend 'triton' requested but Triton cannot run here (no CUDA GPU and "
                      "TRITON_INTERPRET is not set): falling back to 'sdpa'")
            return None
        from anima_kernels import adaln, attention
    except Exception as exc:  # an import failure of an optional accelerator must not stop training
        warn_once(f"attention backend 'triton' unavailable ({exc!r}): falling back to 'sdpa'")
        return None
    return SimpleNamespace(
        qk_norm_rope_attention=attention.qk_norm_rope_attention,
        modulated_layer_norm=adaln.modulated_layer_norm,
        gated_residual_modulated_layer_norm=adaln.gated_residual_modulated_layer_norm,
    )


def get_ops(backend: str) -> SimpleNamespace:
    """The attention / adaLN implementation for ``backend`` (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        ops = _triton_ops()
        if ops is not None:
            return ops
        backend = "sdpa"
    return _reference_ops(use_sdpa=backend == "sdpa")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """The construction-time init (weight = 1), for modules materialized from the meta device."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(x, self.weight, self.eps)


class QKNormAttention(nn.Module):
    """q/k/v/out projections (no bias) with per-head q/k RMSNorm; RoPE tables and key masks are passed in.

    ``out_name`` is the output projection's key (``output_proj`` in the DiT, ``o_proj`` in the adapter).
    """

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int, out_name: str = "output_proj", eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = q_dim // num_heads
        self.out_name = out_name
        self.q_proj = nn.Linear(q_dim, q_dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, q_dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, q_dim, bias=False)
        setattr(self, out_name, nn.Linear(q_dim, q_dim, bias=False))
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.ops = get_ops("sdpa")

    def forward(
        self,
        x_B_Lq_C: torch.Tensor,
        context_B_Lk_Ckv: torch.Tensor | None = None,
        *,
        rope_q=None,
        rope_k=None,
        key_mask_B_Lk: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv_in = x_B_Lq_C if context_B_Lk_Ckv is None else context_B_Lk_Ckv
        B, Lq, _ = x_B_Lq_C.shape
        Lk = kv_in.shape[1]
        q = self.q_proj(x_B_Lq_C).view(B, Lq, self.num_heads, self.head_dim)
        k = self.k_proj(kv_in).view(B, Lk, self.num_heads, self.head_dim)
        v = self.v_proj(kv_in).view(B, Lk, self.num_heads, self.head_dim)
        a = self.ops.qk_norm_rope_attention(
            q, k, v, self.q_norm.weight, self.k_norm.weight,
            rope_q=rope_q, rope_k=rope_k, key_mask_B_Lk=key_mask_B_Lk, eps=self.q_norm.eps,
        )
        return getattr(self, self.out_name)(a.reshape(B, Lq, -1))
