"""Flash attention (forward and backward) in the ``[B, L, H, D]`` layout with an optional boolean key mask.

Shape legend: B batch, Lq / Lk query / key length, H heads, D head dim; BLOCK_M query rows and BLOCK_N keys per tile.

Forward, per query row ``i`` (online softmax over key tiles, base-2 exponentials, ``c = log2(e) / sqrt(D)``)::

    s_ij = c * q_i . k_j            (-inf where key j is masked or out of range)
    m_i  = max_j s_ij,   l_i = sum_j 2^(s_ij - m_i),   o_i = sum_j 2^(s_ij - m_i) v_j / l_i
    lse_i = m_i + log2(l_i)         (saved for the backward)

A row with no valid key (``l_i = 0``) gets ``o_i = 0`` and ``lse_i = +inf``, so every probability the backward
recomputes, ``p_ij = 2^(s_ij - lse_i)``, is exactly 0 there and all gradients through the row vanish
(docs/model.md#pitfall-3).

Backward with ``delta_i = o_i . do_i`` and ``dS_ij = p_ij (do_i . v_j - delta_i)``::

    dv_j = sum_i p_ij do_i,     dk_j = sum_i dS_ij q_i / sqrt(D),     dq_i = sum_j dS_ij k_j / sqrt(D)

By default two kernels recompute ``p`` (one per key tile for dk/dv, one per query tile for dq): no atomics, a
deterministic result. With ``ATOMIC_DQ = True`` the dk/dv kernel also adds ``dS^T k`` into dq with fp32 atomics
(two fewer matmuls per tile pair). dq and dk are written in fp32 because the RMSNorm/RoPE backward consumes them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MIN_DOT_DIM, interpret_block, maybe_autotune, next_pow2, tuning_configs

LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2

# Autotune candidates, checked offline for sm_90 with kernels/bench/aot_check.py (bf16, D 128): each compiles to
# wgmma without register spills. Fields: BLOCK_M (query rows), BLOCK_N (keys), num_warps, num_stages.
_FWD_CONFIGS = tuning_configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3)])
_DKDV_CONFIGS = tuning_configs([(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2)])
_DQ_CONFIGS = tuning_configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)])
_TUNE_KEY = ["D", "LEN_KEY", "HAS_MASK"]
# False: dq by its own kernel (7 matmuls per tile pair in the backward, deterministic). True: the dk/dv kernel also
# computes dq and adds it with fp32 atomics (5 matmuls, run-to-run rounding differences); config below.
ATOMIC_DQ = False
_ATOMIC_DQ_CONFIG = (64, 64, 8, 3)  # BLOCK_M, BLOCK_N, num_warps, num_stages
# Lengths vary per batch (captions, resolutions): do not compile a variant per divisibility class of them.
_NO_SPECIALIZE = ["Lq", "Lk", "LEN_KEY"]
# Keys need masking (a where() per score) only with a key mask or a ragged last key tile.
_MASK_KEYS = triton.heuristics({"MASK_KEYS": lambda a: bool(a["HAS_MASK"]) or a["Lk"] % a["BLOCK_N"] != 0})


@triton.jit
def _load_tile(PTR, offs_l, l_ok, offs_d, d_ok, stride_l):
    """Load a ``[len(offs_l), BLOCK_D]`` tile of one (batch, head); zeros outside the valid rows / dims."""
    ptrs = PTR + offs_l.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    return tl.load(ptrs, mask=l_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _tile_ids(H, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile: ``(pid_bh, b, h, offs_l, l_ok, offs_d, d_ok)`` for grid ``(cdiv(L, BLOCK_L), B * H)``."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_bh, pid_bh // H, pid_bh % H, offs_l, offs_l < L, offs_d, offs_d < D


@triton.jit
def _head(PTR, b, h, stride_b, stride_h):
    """Pointer to head ``h`` of sample ``b`` in a strided ``[B, L, H, D]`` tensor (64-bit batch offset)."""
    return PTR + b.to(tl.int64) * stride_b + h * stride_h


@triton.jit
def _dense_offsets(b, h, offs_l, offs_d, L, H, D):
    """Element offsets of rows ``offs_l`` of head ``h``, sample ``b``, in a contiguous ``[B, L, H, D]`` tensor."""
    return b.to(tl.int64) * L * H * D + h * D + offs_l.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]


@triton.jit
def _key_valid(KMASK, b, stride_mb, offs_n, Lk, HAS_MASK: tl.constexpr):
    """True for keys inside ``Lk`` and (with a mask) marked valid."""
    valid = offs_n < Lk
    if HAS_MASK:
        km = tl.load(KMASK + b * stride_mb + offs_n, mask=valid, other=0)
        valid = valid & (km != 0)
    return valid


@maybe_autotune(_FWD_CONFIGS, _TUNE_KEY)
@_MASK_KEYS
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, KMASK, OUT, LSE,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh, stride_mb,
    H, Lq, Lk, D, qk_scale, LEN_KEY,
    HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, offs_m, m_ok, offs_d, d_ok = _tile_ids(H, Lq, D, BLOCK_M, BLOCK_D)
    q = _load_tile(_head(Q, b, h, stride_qb, stride_qh), offs_m, m_ok, offs_d, d_ok, stride_ql)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_n < Lk, offs_d, d_ok, stride_kl)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK_KEYS:
            valid = _key_valid(KMASK, b, stride_mb, offs_n, Lk, HAS_MASK)
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASK_KEYS:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid (-inf) - (-inf) on all-masked tiles
        else:
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base, offs_n, offs_n < Lk, offs_d, d_ok, stride_vl)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    o_ptrs = _head(OUT, b, h, stride_ob, stride_oh) + offs_m.to(tl.int64)[:, None] * stride_ol
    tl.store(o_ptrs + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(OUT, DO, DELTA, H, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``delta[b, h, i] = o_i . do_i`` in fp32; OUT and DO contiguous ``[B, Lq, H, D]``."""
    pid_bh, b, h, offs_m, m_ok, offs_d, d_ok = _tile_ids(H, Lq, D, BLOCK_M, BLOCK_D)
    offs = _dense_offsets(b, h, offs_m, offs_d, Lq, H, D)
    md_ok = m_ok[:, None] & d_ok[None, :]
    o = tl.load(OUT + offs, mask=md_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=md_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_jit(
    Q, K, V, KMASK, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_mb, H, Lq, Lk, D, sm_scale, qk_scale, LEN_KEY,
    HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv for one key tile over all query tiles; with ATOMIC_DQ also adds this tile's share of dq (fp32)."""
    pid_bh, b, h, offs_n, n_ok, offs_d, d_ok = _tile_ids(H, Lk, D, BLOCK_N, BLOCK_D)
    if MASK_KEYS:
        valid = _key_valid(KMASK, b, stride_mb, offs_n, Lk, HAS_MASK)
    k = _load_tile(_head(K, b, h, stride_kb, stride_kh), offs_n, n_ok, offs_d, d_ok, stride_kl)
    v = _load_tile(_head(V, b, h, stride_vb, stride_vh), offs_n, n_ok, offs_d, d_ok, stride_vl)
    q_base = _head(Q, b, h, stride_qb, stride_qh)
    do_base = DO + b.to(tl.int64) * Lq * H * D + h * D  # DO is contiguous [B, Lq, H, D]
    row_base = pid_bh.to(tl.int64) * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = _load_tile(q_base, offs_m, m_ok, offs_d, d_ok, stride_ql)
        do = _load_tile(do_base, offs_m, m_ok, offs_d, d_ok, H * D)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse[None, :])
        if MASK_KEYS:
            p_t = tl.where(valid[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC) * sm_scale  # [BLOCK_M, BLOCK_D]
            tl.atomic_add(DQ + _dense_offsets(b, h, offs_m, offs_d, Lq, H, D), dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    out = _dense_offsets(b, h, offs_n, offs_d, Lk, H, D)
    nd_ok = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=nd_ok)


_attn_bwd_dkdv_kernel = maybe_autotune(_DKDV_CONFIGS, _TUNE_KEY)(_MASK_KEYS(_attn_bwd_dkdv_jit))
# The atomic-dq variant runs with one fixed config: benchmarking it inside the autotuner would accumulate into dq.
_attn_bwd_dkdv_atomic_kernel = _MASK_KEYS(_attn_bwd_dkdv_jit)


@maybe_autotune(_DQ_CONFIGS, _TUNE_KEY)
@_MASK_KEYS
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, KMASK, DO, LSE, DELTA, DQ,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_mb, H, Lq, Lk, D, sm_scale, qk_scale, LEN_KEY,
    HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, offs_m, m_ok, offs_d, d_ok = _tile_ids(H, Lq, D, BLOCK_M, BLOCK_D)
    q = _load_tile(_head(Q, b, h, stride_qb, stride_qh), offs_m, m_ok, offs_d, d_ok, stride_ql)
    do = _load_tile(DO + b.to(tl.int64) * Lq * H * D + h * D, offs_m, m_ok, offs_d, d_ok, H * D)
    row_base = pid_bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k = _load_tile(k_base, offs_n, n_ok, offs_d, d_ok, stride_kl)
        v = _load_tile(v_base, offs_n, n_ok, offs_d, d_ok, stride_vl)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK_KEYS:
            valid = _key_valid(KMASK, b, stride_mb, offs_n, Lk, HAS_MASK)
            p = tl.where(valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(DQ + _dense_offsets(b, h, offs_m, offs_d, Lq, H, D), (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products ("ieee", the correctness path); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(Lq: int, Lk: int) -> dict:
    """Explicit tile sizes under the interpreter; empty on a GPU, where the autotuner picks them."""
    return {"BLOCK_M": interpret_block(Lq), "BLOCK_N": interpret_block(Lk)} if INTERPRET else {}


def _len_key(Lq: int, Lk: int) -> int:
    """Autotune bucket for the two lengths (log2 of their next powers of two), so that varying caption lengths do
    not re-tune while self- (4096 x 4096) and cross-attention (4096 x 512) get their own configs."""
    return (next_pow2(Lq, 16).bit_length() << 8) | next_pow2(Lk, 16).bit_length()


def flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` (last dim contiguous), ``key_mask`` bool/uint8 ``[B, Lk]``.

    Returns ``(o [B, Lq, H, D] contiguous in q.dtype, lse [B, H, Lq] fp32 in base-2 units)``.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if B * H * Lq == 0:
        return o, lse
    mask = key_mask if key_mask is not None else lse  # dummy pointer when HAS_MASK is False
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, mask, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        key_mask.stride(0) if key_mask is not None else 0,
        H, Lq, Lk, D, LOG2E / math.sqrt(D), _len_key(Lq, Lk),
        HAS_MASK=key_mask is not None, DOT_PREC=_dot_precision(q.dtype), BLOCK_D=next_pow2(D, MIN_DOT_DIM),
        **_blocks(Lq, Lk),
    )
    return o, lse


def flash_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`flash_forward`. Returns ``(dq fp32, dk fp32, dv in v.dtype)``, all contiguous."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    do = do.contiguous()
    dq = torch.empty((B, Lq, H, D), device=q.device, dtype=torch.float32)
    dk = torch.empty((B, Lk, H, D), device=q.device, dtype=torch.float32)
    dv = torch.empty((B, Lk, H, D), device=q.device, dtype=v.dtype)
    if B * H == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if Lq == 0:
        return dq, dk.zero_(), dv.zero_()
    block_d = next_pow2(D, MIN_DOT_DIM)
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    _attn_bwd_delta_kernel[(triton.cdiv(Lq, 64), B * H)](o, do, delta, H, Lq, D, BLOCK_M=64, BLOCK_D=block_d)
    mask = key_mask if key_mask is not None else lse
    args = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), key_mask.stride(0) if key_mask is not None else 0,
        H, Lq, Lk, D, 1.0 / math.sqrt(D), LOG2E / math.sqrt(D), _len_key(Lq, Lk),
    )
    consts = {"HAS_MASK": key_mask is not None, "DOT_PREC": _dot_precision(q.dtype), "BLOCK_D": block_d}
    grid_kv = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)
    if ATOMIC_DQ:
        dq.zero_()
        m, n, w, st = _ATOMIC_DQ_CONFIG
        tiles = _blocks(Lq, Lk) or {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}
        _attn_bwd_dkdv_atomic_kernel[grid_kv](q, k, v, mask, do, lse, delta, dk, dv, dq, *args, **consts,
                                              ATOMIC_DQ=True, **tiles)
        return dq, dk, dv
    consts.update(_blocks(Lq, Lk))  # explicit tiles under the interpreter, autotuned on a GPU
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, mask, do, lse, delta, dk, dv, dq, *args, **consts, ATOMIC_DQ=False)
    grid_q = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _attn_bwd_dq_kernel[grid_q](q, k, v, mask, do, lse, delta, dq, *args, **consts)
    return dq, dk, dv
