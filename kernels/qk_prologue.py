"""Attention prologue kernel: per-head RMSNorm with a learnable weight, then optional half-split RoPE.

Shape legend: B batch, L length, H heads, D head dim, R = B*L*H rows of D values.

Forward, per row ``x`` (one head of one token at position ``l``), all in fp32::

    r      = 1 / sqrt(mean(x^2) + eps)
    n[d]   = x[d] * r * w[d]
    y[d]   = n[d] * cos[l, d] + s[d] * n[p(d)] * sin[l, d]          (with RoPE; else y = n)

where ``p(d) = d + D/2`` for the first half and ``d - D/2`` for the second (the partner dim of the half-split
convention) and ``s[d] = -1`` for the first half, ``+1`` for the second, i.e. ``rotate_half(n) = s * n[p]``.

Backward, given ``g = dL/dy`` (fp32)::

    dn[e]  = g[e] * cos[l, e] - s[e] * g[p(e)] * sin[l, p(e)]       (with RoPE; else dn = g)
    dw[e]  = sum_rows dn[e] * x[e] * r                              (per-program partial sums, reduced in torch)
    dx     = r * (dn*w - xhat * mean(dn*w*xhat)),   xhat = x * r

The forward writes ``y`` contiguous in ``[B, L, H, D]`` (the attention kernel's input) and ``r`` per row; the
backward recomputes everything else from the raw input (cheaper than saving ``n``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, next_pow2


@triton.jit
def _row_tile(n_rows, L, H, D, stride_b, stride_l, stride_h, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows (one row = one (b, l, h) head vector): ``(rows, row_ok, pos, offs, offs_d, d_ok, mask)``
    with the position l of each row, its element offset into a strided [B, L, H, D], and the [BLOCK_R, BLOCK_D]
    mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = rows % H
    pos = (rows // H) % L
    b = rows // (H * L)
    offs = b.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_l + h.to(tl.int64) * stride_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = rows < n_rows
    return rows, row_ok, pos, offs, offs_d, d_ok, row_ok[:, None] & d_ok[None, :]


@triton.jit
def _norm_rope_fwd_kernel(
    X, W, COS, SIN, Y, RSTD,
    n_rows, L, H, D, stride_xb, stride_xl, stride_xh, stride_cl, eps,
    HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok, pos, x_offs, offs_d, d_ok, m2 = _row_tile(n_rows, L, H, D, stride_xb, stride_xl, stride_xh,
                                                            BLOCK_R, BLOCK_D)
    x = tl.load(X + x_offs[:, None] + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        half = D // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        sign = tl.where(first, -1.0, 1.0)
        xp = tl.load(X + x_offs[:, None] + partner[None, :], mask=m2, other=0.0).to(tl.float32)
        wp = tl.load(W + partner, mask=d_ok, other=0.0).to(tl.float32)
        c_offs = pos.to(tl.int64)[:, None] * stride_cl + offs_d[None, :]
        cos = tl.load(COS + c_offs, mask=m2, other=0.0)
        sin = tl.load(SIN + c_offs, mask=m2, other=0.0)
        y = y * cos + sign[None, :] * (xp * rstd[:, None] * wp[None, :]) * sin
    y_offs = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=m2)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _norm_rope_bwd_kernel(
    X, W, COS, SIN, RSTD, DY, DX, DW_PARTIAL,
    n_rows, L, H, D, stride_xb, stride_xl, stride_xh, stride_cl,
    HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok, pos, x_offs, offs_d, d_ok, m2 = _row_tile(n_rows, L, H, D, stride_xb, stride_xl, stride_xh,
                                                            BLOCK_R, BLOCK_D)
    y_offs = rows.to(tl.int64)[:, None] * D
    g = tl.load(DY + y_offs + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_ROPE:
        half = D // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        sign = tl.where(first, -1.0, 1.0)
        gp = tl.load(DY + y_offs + partner[None, :], mask=m2, other=0.0).to(tl.float32)
        c_row = pos.to(tl.int64)[:, None] * stride_cl
        cos = tl.load(COS + c_row + offs_d[None, :], mask=m2, other=0.0)
        sin_p = tl.load(SIN + c_row + partner[None, :], mask=m2, other=0.0)
        dn = g * cos - sign[None, :] * gp * sin_p
    else:
        dn = g
    x = tl.load(X + x_offs[:, None] + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    w = tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    tl.store(DW_PARTIAL + tl.program_id(0) * BLOCK_D + offs_d, tl.sum(dn * xhat, axis=0))
    dxhat = dn * w[None, :]
    c = tl.sum(dxhat * xhat, axis=1) / D
    dx = rstd[:, None] * (dxhat - xhat * c[:, None])
    tl.store(DX + y_offs + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=m2)


NUM_WARPS = 8  # GPU launches: 4K-element tiles over 256 threads


def _block_rows(block_d: int, n_rows: int) -> int:
    """Rows per program: about 4K elements per program on a GPU; under the interpreter, small tiles for small
    inputs (several programs, so the cross-program weight-gradient sum is exercised) and 512 rows otherwise."""
    if INTERPRET:
        return 16 if n_rows <= 256 else 512
    return max(1, 4096 // block_d)


def norm_rope_forward(
    x_B_L_H_D: torch.Tensor, weight_D: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; returns ``(y [B, L, H, D] contiguous in x.dtype, rstd [B*L*H] fp32)``."""
    B, L, H, D = x_B_L_H_D.shape
    n_rows = B * L * H
    y = torch.empty((B, L, H, D), device=x_B_L_H_D.device, dtype=x_B_L_H_D.dtype)
    rstd = torch.empty(n_rows, device=x_B_L_H_D.device, dtype=torch.float32)
    if n_rows == 0:
        return y, rstd
    cos, sin = rope if rope is not None else (rstd, rstd)  # dummies, never read without HAS_ROPE
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, n_rows)
    sb, sl, sh, _ = x_B_L_H_D.stride()
    grid = (triton.cdiv(n_rows, block_r),)
    _norm_rope_fwd_kernel[grid](
        x_B_L_H_D, weight_D, cos, sin, y, rstd,
        n_rows, L, H, D, sb, sl, sh, cos.stride(0) if rope is not None else 0, eps,
        HAS_ROPE=rope is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return y, rstd


def norm_rope_backward(
    dy_B_L_H_D: torch.Tensor,
    x_B_L_H_D: torch.Tensor,
    weight_D: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; ``dy`` contiguous (any float dtype). Returns ``(dx like x, dweight like weight)``."""
    B, L, H, D = x_B_L_H_D.shape
    n_rows = B * L * H
    dx = torch.empty((B, L, H, D), device=x_B_L_H_D.device, dtype=x_B_L_H_D.dtype)
    if n_rows == 0:
        return dx, torch.zeros_like(weight_D)
    cos, sin = rope if rope is not None else (rstd, rstd)
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, n_rows)
    n_prog = triton.cdiv(n_rows, block_r)
    dw_partial = torch.empty((n_prog, block_d), device=x_B_L_H_D.device, dtype=torch.float32)
    sb, sl, sh, _ = x_B_L_H_D.stride()
    _norm_rope_bwd_kernel[(n_prog,)](
        x_B_L_H_D, weight_D, cos, sin, rstd, dy_B_L_H_D, dx, dw_partial,
        n_rows, L, H, D, sb, sl, sh, cos.stride(0) if rope is not None else 0,
        HAS_ROPE=rope is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    dw = dw_partial.sum(dim=0)[:D].to(weight_D.dtype)
    return dx, dw
