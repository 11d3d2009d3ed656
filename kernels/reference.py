"""Plain-PyTorch references for every fused kernel: the test oracle and the CPU fallback.

The model calls these functions (through ``anima_ft.model.layers``) when the ``reference`` or ``sdpa`` backend is
selected, and the Triton kernels in this package implement exactly the same signatures and math.

Shape legend: B batch, Lq / Lk query / key length, H heads, D head dim, C channels (model width).
All attention tensors use the projection layout ``[B, L, H, D]`` (what ``Linear`` output ``.view`` gives), not
``[B, H, L, D]``.

Math (see docs/model.md#rope, #adaln and #adapter):

* RMSNorm over the last dim, computed in fp32:  ``y = x / sqrt(mean(x^2) + eps) * w``.
* Half-split RoPE:  ``rope(x) = x*cos + rotate_half(x)*sin``, ``rotate_half([x1, x2]) = [-x2, x1]``,
  with ``cos, sin`` of shape ``[L, D]`` (the angle table duplicated over both halves), applied in fp32.
* Attention:  ``softmax(q k^T / sqrt(D) + mask) v`` with an optional boolean key mask (True = attend).
  A query row whose keys are all masked returns exactly 0 (docs/model.md#pitfall-3), with zero gradient.
* adaLN modulate:  ``LN(x) * (1 + scale) + shift`` with a LayerNorm without affine (eps 1e-6), in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor]


def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (float64 stays float64, so float64 parity tests keep their precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times ``weight`` (if given), cast back to ``x.dtype``."""
    x32 = _up(x)
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _up(weight)
    return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dim (non-interleaved convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_B_L_H_D: torch.Tensor, cos_L_D: torch.Tensor, sin_L_D: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE in fp32; ``cos``/``sin`` are ``[L, D]`` and broadcast over batch and heads."""
    x32 = _up(x_B_L_H_D)
    cos = _up(cos_L_D)[None, :, None, :]
    sin = _up(sin_L_D)[None, :, None, :]
    return (x32 * cos + rotate_half(x32) * sin).to(x_B_L_H_D.dtype)


def _math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Explicit ``softmax(q k^T / sqrt(D)) v`` in fp32 on ``[B, H, L, D]`` tensors (the oracle)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", _up(q), _up(k)) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), _up(v)).to(q.dtype)


def attention(
    q_B_Lq_H_D: torch.Tensor,
    k_B_Lk_H_D: torch.Tensor,
    v_B_Lk_H_D: torch.Tensor,
    key_mask_B_Lk: torch.Tensor | None = None,
    *,
    use_sdpa: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention in the ``[B, L, H, D]`` layout; fully masked rows give exactly 0.

    ``use_sdpa=True`` runs ``F.scaled_dot_product_attention`` (flash / cuDNN on a GPU); ``False`` runs the explicit
    fp32 math, the oracle for kernel tests.
    """
    sdpa = F.scaled_dot_product_attention if use_sdpa else _math_sdpa
    q = q_B_Lq_H_D.transpose(1, 2)
    k = k_B_Lk_H_D.transpose(1, 2)
    v = v_B_Lk_H_D.transpose(1, 2)
    if key_mask_B_Lk is None:
        out = sdpa(q, k, v, None)
        return out.transpose(1, 2)
    key_mask = key_mask_B_Lk.bool()
    any_valid_B = key_mask.any(dim=-1)
    # A row with no valid key would be 0/0 in the softmax: attend to everything there (finite, well-defined
    # gradients) and zero the result afterwards, so the output and every gradient through it are exactly 0.
    safe_mask = key_mask | ~any_valid_B[:, None]
    out = sdpa(q, k, v, safe_mask[:, None, None, :])
    out = out * any_valid_B[:, None, None, None].to(out.dtype)
    return out.transpose(1, 2)


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
    use_sdpa: bool = True,
) -> torch.Tensor:
    """Per-head RMSNorm on q and k, optional RoPE on each (own position tables), then attention.

    Covers all three attention flavours of Anima:

    * DiT self-attention: ``rope_q = rope_k`` = the 3D table, no mask (kernel 1);
    * DiT cross-attention: no RoPE, no mask (kernel 2; an optional key mask is allowed for reuse);
    * LLM adapter attention: 1D RoPE with separate position spaces for q and k and a key mask (kernel 3).
    """
    q = rms_norm(q_B_Lq_H_D, q_norm_weight, eps)
    k = rms_norm(k_B_Lk_H_D, k_norm_weight, eps)
    if rope_q is not None:
        q = apply_rope(q, *rope_q)
    if rope_k is not None:
        k = apply_rope(k, *rope_k)
    return attention(q, k, v_B_Lk_H_D, key_mask_B_Lk, use_sdpa=use_sdpa)


def modulated_layer_norm(
    x_B_L_C: torch.Tensor, shift_B_1_C: torch.Tensor, scale_B_1_C: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x, no affine) * (1 + scale) + shift`` in fp32, cast back to ``x.dtype``."""
    x32 = _up(x_B_L_C)
    y = F.layer_norm(x32, (x32.shape[-1],), eps=eps)
    y = y * (1 + _up(scale_B_1_C)) + _up(shift_B_1_C)
    return y.to(x_B_L_C.dtype)


def gated_residual_modulated_layer_norm(
    x_B_L_C: torch.Tensor,
    gate_B_1_C: torch.Tensor,
    y_B_L_C: torch.Tensor,
    shift_B_1_C: torch.Tensor,
    scale_B_1_C: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual fused with the next norm-and-modulate.

    Returns ``(x_new, h)`` with ``x_new = x + gate * y`` (in ``x.dtype``) and
    ``h = modulated_layer_norm(x_new, shift, scale)``.
    """
    x_new = x_B_L_C + gate_B_1_C * y_B_L_C
    return x_new, modulated_layer_norm(x_new, shift_B_1_C, scale_B_1_C, eps)
