"""adaLN glue kernels: modulated LayerNorm, and the gated residual fused with the next modulated LayerNorm.

Shape legend: B batch, L tokens, C channels; shift / scale / gate are per sample ``[B, 1, C]``.

Forward, per row ``x`` of C values (fp32 math, results cast to ``x.dtype``)::

    mu = mean(x),  r = 1 / sqrt(mean((x - mu)^2) + eps),  xhat = (x - mu) * r
    h  = xhat * (1 + scale) + shift                                        modulated_layer_norm
    x' = x + gate * y,  h = modulated_layer_norm(x', shift, scale)         gated_residual_modulated_layer_norm

Backward, given ``dh`` (and ``dx'`` for the fused form), with sums over the L rows of each sample::

    dshift = sum_L dh,   dscale = sum_L dh * xhat,   g = dh * (1 + scale)
    dx'    = r * (g - mean(g) - xhat * mean(g * xhat))   (+ the incoming dx' in the fused form)
    dx = dx',   dy = dx' * gate,   dgate = sum_L dx' * y                   (fused form only)

One program owns ``ROWS`` consecutive rows of one sample and writes partial sums for dshift / dscale / dgate,
which torch reduces over the few programs per sample; mean and r are saved per row from the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference, warn_once
from ._common import INTERPRET, check_device, next_pow2


@triton.jit
def _row_tile(b, first_row, L, C, offs_c, c_ok, BLOCK_R: tl.constexpr):
    """Rows ``first_row + [0, BLOCK_R)`` of sample ``b`` in a contiguous ``[B, L, C]``: ``(r_ok, mask, row_ids,
    offs)`` with the [BLOCK_R, BLOCK_C] mask, flat row ids (for per-row stats) and element offsets."""
    rows = first_row + tl.arange(0, BLOCK_R)
    r_ok = rows < L
    row_ids = b.to(tl.int64) * L + rows
    return r_ok, r_ok[:, None] & c_ok[None, :], row_ids, row_ids[:, None] * C + offs_c[None, :]


@triton.jit
def _adaln_fwd_kernel(
    X, GATE, Y, SHIFT, SCALE, XNEW, OUT, MEAN, RSTD, L, C, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    pid_l = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    shift = tl.load(SHIFT + b * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(SCALE + b * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(GATE + b * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        r_ok, m2, row_ids, offs = _row_tile(b, pid_l * ROWS + r0, L, C, offs_c, c_ok, BLOCK_R)
        x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(Y + offs, mask=m2, other=0.0).to(tl.float32)
            x_new = (x + gate[None, :] * y).to(XNEW.dtype.element_ty)
            tl.store(XNEW + offs, x_new, mask=m2)
            x = x_new.to(tl.float32)  # normalize the stored (rounded) residual, as the reference does
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(c_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        h = xc * rstd[:, None] * scale1[None, :] + shift[None, :]
        tl.store(OUT + offs, h.to(OUT.dtype.element_ty), mask=m2)
        tl.store(MEAN + row_ids, mean, mask=r_ok)
        tl.store(RSTD + row_ids, rstd, mask=r_ok)


@triton.jit
def _adaln_bwd_kernel(
    XN, SCALE, MEAN, RSTD, DH, DXNEW, GATE, Y, DX, DY, DSHIFT_P, DSCALE_P, DGATE_P, L, C,
    HAS_RES: tl.constexpr, HAS_DXNEW: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    pid_l = tl.program_id(1)
    n_prog_l = tl.num_programs(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    scale1 = 1.0 + tl.load(SCALE + b * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(GATE + b * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_C], tl.float32)
    dscale = tl.zeros([BLOCK_C], tl.float32)
    dgate = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        r_ok, m2, row_ids, offs = _row_tile(b, pid_l * ROWS + r0, L, C, offs_c, c_ok, BLOCK_R)
        x = tl.load(XN + offs, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row_ids, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + row_ids, mask=r_ok, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        dh = tl.load(DH + offs, mask=m2, other=0.0).to(tl.float32)
        dshift += tl.sum(dh, axis=0)
        dscale += tl.sum(dh * xhat, axis=0)
        g = dh * scale1[None, :]
        c1 = tl.sum(g, axis=1) / C
        c2 = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        if HAS_RES:
            if HAS_DXNEW:
                dx += tl.load(DXNEW + offs, mask=m2, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=m2, other=0.0).to(tl.float32)
            dgate += tl.sum(dx * y, axis=0)
            tl.store(DY + offs, (dx * gate[None, :]).to(DY.dtype.element_ty), mask=m2)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m2)
    p_offs = (b * n_prog_l + pid_l).to(tl.int64) * C + offs_c
    tl.store(DSHIFT_P + p_offs, dshift, mask=c_ok)
    tl.store(DSCALE_P + p_offs, dscale, mask=c_ok)
    if HAS_RES:
        tl.store(DGATE_P + p_offs, dgate, mask=c_ok)


def _launch_shape(B: int, L: int, C: int) -> tuple[int, int, int, int]:
    """``(BLOCK_C, BLOCK_R, ROWS, num_warps)``: ~4K-element tiles, ~512 programs (4 per H100 SM), <= 256 rows
    each. Fewer, longer programs keep the backward's partial-sum buffer small (12 MB at B4 L4096 C2048)."""
    block_c = next_pow2(C)
    if INTERPRET:
        return block_c, 4, 8, 4
    block_r = max(1, 4096 // block_c)
    rows = min(max(next_pow2(triton.cdiv(B * L, 512)), block_r), 256)
    return block_c, block_r, rows, 8 if block_c >= 2048 else 4


def _fwd(x, gate, y, shift, scale, eps, has_res):
    B, L, C = x.shape
    block_c, block_r, rows, warps = _launch_shape(B, L, C)
    out = torch.empty_like(x)
    x_new = torch.empty_like(x) if has_res else out
    mean = torch.empty(B * L, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B * L > 0:
        grid = (B, triton.cdiv(L, rows))
        _adaln_fwd_kernel[grid](
            x, gate if has_res else x, y if has_res else x, shift, scale, x_new, out, mean, rstd, L, C, eps,
            HAS_RES=has_res, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    return x_new, out, mean, rstd


def _bwd(x_norm_in, scale, mean, rstd, dh, dx_new, gate, y, has_res):
    B, L, C = x_norm_in.shape
    block_c, block_r, rows, warps = _launch_shape(B, L, C)
    n_prog_l = triton.cdiv(L, rows)
    dx = torch.empty_like(x_norm_in)
    dy = torch.empty_like(y) if has_res else dx
    # every program writes its row of partial sums (dgate only in the fused form), so no zero-fill is needed
    partials = torch.empty((3 if has_res else 2, B, n_prog_l, C), device=dx.device, dtype=torch.float32)
    if B * L > 0:
        _adaln_bwd_kernel[(B, n_prog_l)](
            x_norm_in, scale, mean, rstd, dh.contiguous(),
            dx_new.contiguous() if dx_new is not None else dh, gate if has_res else scale,
            y if has_res else dh, dx, dy, partials[0], partials[1], partials[-1], L, C,
            HAS_RES=has_res, HAS_DXNEW=dx_new is not None, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=warps,
        )
    sums = partials.sum(dim=2, keepdim=True)  # [2 or 3, B, 1, C]
    return dx, dy, sums[0], sums[1], sums[2] if has_res else None


class _ModulatedLayerNorm(torch.autograd.Function):
    """``LN(x) * (1 + scale) + shift``; shift / scale given as ``[B, C]`` contiguous."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        _, h, mean, rstd = _fwd(x, None, None, shift, scale, eps, has_res=False)
        ctx.save_for_backward(x, scale, mean, rstd)
        return h

    @staticmethod
    def backward(ctx, dh):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, _, dshift, dscale, _ = _bwd(x, scale, mean, rstd, dh, None, None, None, has_res=False)
        return dx, dshift.view(scale.shape).to(scale.dtype), dscale.view(scale.shape).to(scale.dtype), None


class _GatedResidualModulatedLayerNorm(torch.autograd.Function):
    """``x' = x + gate * y`` and ``LN(x') * (1 + scale) + shift``; per-sample vectors as ``[B, C]``."""

    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, eps):
        x_new, h, mean, rstd = _fwd(x, gate, y, shift, scale, eps, has_res=True)
        ctx.save_for_backward(x_new, gate, y, scale, mean, rstd)
        return x_new, h

    @staticmethod
    def backward(ctx, dx_new, dh):
        x_new, gate, y, scale, mean, rstd = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(x_new)
        dx, dy, dshift, dscale, dgate = _bwd(x_new, scale, mean, rstd, dh, dx_new, gate, y, has_res=True)
        cast = lambda t, like: t.view(like.shape).to(like.dtype)
        return dx, cast(dgate, gate), dy, cast(dshift, scale), cast(dscale, scale), None


def _per_sample(t: torch.Tensor, name: str, B: int, C: int) -> torch.Tensor:
    """``[B or 1, 1, C]`` -> contiguous ``[B, C]`` (a broadcast copy is differentiable through autograd)."""
    if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != C or t.shape[0] not in (1, B):
        raise ValueError(f"{name} must have shape [B, 1, C] = [{B}, 1, {C}] (one vector per sample), got "
                         f"{list(t.shape)}; per-frame modulation [B, T, C] with T > 1 is not supported by the "
                         "kernel, use the reference backend for video")
    return t.expand(B, 1, C).reshape(B, C).contiguous()


def _check_x(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be a [B, L, C] fp16/bf16/fp32 tensor, got {list(x.shape)} {x.dtype}")


def modulated_layer_norm(
    x_B_L_C: torch.Tensor, shift_B_1_C: torch.Tensor, scale_B_1_C: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x, no affine) * (1 + scale) + shift`` in fp32, in ``x.dtype``; Triton forward and backward.

    Same semantics as ``kernels.reference.modulated_layer_norm``; gradients for x, shift and scale. float64 inputs
    run the reference (warned once).
    """
    if x_B_L_C.dtype == torch.float64:
        warn_once("modulated_layer_norm: float64 inputs run the plain-PyTorch reference (kernels cover fp16/bf16/fp32)")
        return reference.modulated_layer_norm(x_B_L_C, shift_B_1_C, scale_B_1_C, eps)
    _check_x(x_B_L_C, "x_B_L_C")
    B, _, C = x_B_L_C.shape
    check_device(x_B_L_C, shift_B_1_C, scale_B_1_C)
    shift = _per_sample(shift_B_1_C, "shift_B_1_C", B, C)
    scale = _per_sample(scale_B_1_C, "scale_B_1_C", B, C)
    h = _ModulatedLayerNorm.apply(x_B_L_C.contiguous(), shift, scale, float(eps))
    return h


def gated_residual_modulated_layer_norm(
    x_B_L_C: torch.Tensor,
    gate_B_1_C: torch.Tensor,
    y_B_L_C: torch.Tensor,
    shift_B_1_C: torch.Tensor,
    scale_B_1_C: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual fused with the next norm-and-modulate: returns ``(x_new, h)``, both in ``x.dtype``.

    ``x_new = x + gate * y`` (computed in fp32, rounded once) and ``h = modulated_layer_norm(x_new, shift, scale)``;
    same semantics as ``kernels.reference.gated_residual_modulated_layer_norm``. Gradients for every tensor input.
    """
    if x_B_L_C.dtype == torch.float64:
        warn_once("gated_residual_modulated_layer_norm: float64 inputs run the plain-PyTorch reference (kernels "
                  "cover fp16/bf16/fp32)")
        return reference.gated_residual_modulated_layer_norm(x_B_L_C, gate_B_1_C, y_B_L_C, shift_B_1_C, scale_B_1_C,
                                                             eps)
    _check_x(x_B_L_C, "x_B_L_C")
    if y_B_L_C.shape != x_B_L_C.shape:
        raise ValueError(f"y_B_L_C must have the shape of x {list(x_B_L_C.shape)}, got {list(y_B_L_C.shape)}")
    B, _, C = x_B_L_C.shape
    check_device(x_B_L_C, gate_B_1_C, y_B_L_C, shift_B_1_C, scale_B_1_C)
    gate = _per_sample(gate_B_1_C, "gate_B_1_C", B, C)
    shift = _per_sample(shift_B_1_C, "shift_B_1_C", B, C)
    scale = _per_sample(scale_B_1_C, "scale_B_1_C", B, C)
    return _GatedResidualModulatedLayerNorm.apply(
        x_B_L_C.contiguous(), gate, y_B_L_C.contiguous(), shift, scale, float(eps)
    )
