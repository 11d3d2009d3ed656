"""Fused attention for all three Anima attention flavours: q/k RMSNorm + RoPE prologue and flash attention.

Shape legend: B batch, Lq / Lk query / key length, H heads, D head dim (``[B, L, H, D]`` projection layout).

Math (identical to ``kernels.reference.qk_norm_rope_attention``)::

    q' = rope_q(RMSNorm(q) * w_q),   k' = rope_k(RMSNorm(k) * w_k)          (RoPE optional, per side)
    o  = softmax(q' k'^T / sqrt(D) + mask) v                               (fully masked rows -> 0)

Design: one ``autograd.Function`` that runs three kernels forward (prologue on q, prologue on k, flash forward) and
four backward (flash dk/dv and dq kernels, then the prologue backward on each side, which turns the fp32 ``dq'``,
``dk'`` into ``dq``, ``dk`` and the norm-weight gradients). The normalized ``q'``, ``k'`` are recomputed in the
backward by default instead of kept alive between forward and backward (see ``RECOMPUTE_PROLOGUE`` and
kernels/README.md for the trade-off).
"""

from __future__ import annotations

import torch

from . import reference, warn_once
from ._common import check_device, last_dim_contiguous
from .flash import flash_backward, flash_forward
from .qk_prologue import norm_rope_backward, norm_rope_forward

Rope = tuple[torch.Tensor, torch.Tensor]

# True: keep only q, k, v, o and the softmax statistics for the backward and recompute the normalized q', k' there
# (two cheap memory-bound passes). False: also save q', k' (2 extra activations per attention call, faster backward).
RECOMPUTE_PROLOGUE = True

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _QkNormRopeAttention(torch.autograd.Function):
    """Autograd wrapper: gradients for q, k, v and both norm weights (RoPE tables and mask get none)."""

    @staticmethod
    def forward(ctx, q, k, v, w_q, w_k, cos_q, sin_q, cos_k, sin_k, key_mask, eps):
        rope_q = (cos_q, sin_q) if cos_q is not None else None
        rope_k = (cos_k, sin_k) if cos_k is not None else None
        q_hat, rstd_q = norm_rope_forward(q, w_q, rope_q, eps)
        k_hat, rstd_k = norm_rope_forward(k, w_k, rope_k, eps)
        o, lse = flash_forward(q_hat, k_hat, v, key_mask)
        saved_hat = (None, None) if RECOMPUTE_PROLOGUE else (q_hat, k_hat)
        ctx.save_for_backward(q, k, v, w_q, w_k, cos_q, sin_q, cos_k, sin_k, key_mask, o, lse, rstd_q, rstd_k,
                              *saved_hat)
        ctx.eps = eps
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, w_q, w_k, cos_q, sin_q, cos_k, sin_k, key_mask, o, lse, rstd_q, rstd_k, q_hat, k_hat = (
            ctx.saved_tensors
        )
        rope_q = (cos_q, sin_q) if cos_q is not None else None
        rope_k = (cos_k, sin_k) if cos_k is not None else None
        if q_hat is None:
            q_hat, _ = norm_rope_forward(q, w_q, rope_q, ctx.eps)
            k_hat, _ = norm_rope_forward(k, w_k, rope_k, ctx.eps)
        dq_hat, dk_hat, dv = flash_backward(do, q_hat, k_hat, v, key_mask, o, lse)
        dq, dw_q = norm_rope_backward(dq_hat, q, w_q, rope_q, rstd_q)
        dk, dw_k = norm_rope_backward(dk_hat, k, w_k, rope_k, rstd_k)
        return dq, dk, dv, dw_q, dw_k, None, None, None, None, None, None


def _check_rope(rope: Rope | None, name: str, L: int, D: int, device: torch.device) -> tuple:
    """Validate a ``(cos [L, D], sin [L, D])`` table; returns fp32 contiguous ``(cos, sin)`` or ``(None, None)``."""
    if rope is None:
        return None, None
    if len(rope) != 2:
        raise ValueError(f"{name} must be a (cos, sin) pair, got {len(rope)} tensors")
    if D % 2:
        raise ValueError(f"{name}: half-split RoPE needs an even head dim, got D={D}")
    out = []
    for t, part in zip(rope, ("cos", "sin")):
        if tuple(t.shape) != (L, D):
            raise ValueError(f"{name} {part} must have shape [L, D] = [{L}, {D}], got {list(t.shape)}; "
                             "slice the table to the sequence length")
        out.append(t.to(device=device, dtype=torch.float32).contiguous())
    return tuple(out)


def qk_norm_rope_attention(
    q_B_Lq_H_D: torch.Tensor,
    k_B_Lk_H_D: torch.Tensor,
    v_B_Lk_H_D: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    *,
    rope_q: Rope | None = None,
    rope_k: Rope | None = None,
    key_mask_B_Lk: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-head RMSNorm on q and k, optional RoPE on each (own position tables), then attention; Triton kernels.

    Same arguments and result as ``kernels.reference.qk_norm_rope_attention`` (minus ``use_sdpa``): returns
    ``[B, Lq, H, D]`` (contiguous) in ``q``'s dtype; a query row whose keys are all masked gives exactly 0.
    Differentiable in q, k, v and both norm weights. Inputs may be strided views as long as the head dim is
    contiguous (e.g. ``qkv.view(B, L, 3, H, D).unbind(2)``). float64 inputs run the reference (warned once).
    """
    q, k, v = q_B_Lq_H_D, k_B_Lk_H_D, v_B_Lk_H_D
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got shapes {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if k.shape != (B, Lk, H, D) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, Lk, H={H}, D={D}] with equal Lk; got {list(k.shape)} and "
                         f"{list(v.shape)}")
    if q.dtype == k.dtype == v.dtype == torch.float64:
        warn_once("qk_norm_rope_attention: float64 inputs run the plain-PyTorch reference (the Triton kernels "
                  "cover fp16/bf16/fp32)")
        return reference.qk_norm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, rope_q=rope_q, rope_k=rope_k,
                                                key_mask_B_Lk=key_mask_B_Lk, eps=eps, use_sdpa=False)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype out of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    for w, name in ((q_norm_weight, "q_norm_weight"), (k_norm_weight, "k_norm_weight")):
        if tuple(w.shape) != (D,):
            raise ValueError(f"{name} must have shape [D] = [{D}], got {list(w.shape)}")
    check_device(q, k, v, q_norm_weight, k_norm_weight)
    cos_q, sin_q = _check_rope(rope_q, "rope_q", Lq, D, q.device)
    cos_k, sin_k = _check_rope(rope_k, "rope_k", Lk, D, q.device)
    mask = None
    if key_mask_B_Lk is not None:
        if tuple(key_mask_B_Lk.shape) != (B, Lk):
            raise ValueError(f"key_mask_B_Lk must have shape [B, Lk] = [{B}, {Lk}], got {list(key_mask_B_Lk.shape)}")
        mask = key_mask_B_Lk.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    return _QkNormRopeAttention.apply(
        last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v),
        q_norm_weight.contiguous(), k_norm_weight.contiguous(), cos_q, sin_q, cos_k, sin_k, mask, float(eps),
    )
