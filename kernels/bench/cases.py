"""Benchmark cases for kernels/bench/gpu_check.py: each returns rows of timings for one kernel and its baselines.

Shape legend: B batch, S / Lq / Lk lengths, H heads, D head dim, C = H * D channels. Full-size shapes are the
issue's (B4 H16 S4096 D128 bf16, cross-attention Skv 512, adaLN C 2048); ``smoke`` shrinks everything so the
script can be exercised on CPU under TRITON_INTERPRET=1 (numbers meaningless there).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from anima_kernels import reference


def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` (CUDA events) on a GPU, a wall clock on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=grad_to_none)
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _sdpa_backend(name: str | None):
    """Context forcing one SDPA backend (``cudnn`` / ``flash``), or nothing for the default choice."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]])


def _time_variant(name, fwd, leaves, flops_fwd, ctx_name=None) -> dict:
    """Time ``fwd()`` and ``fwd().backward(g)``; errors (e.g. a backend missing) are recorded, not raised."""
    try:
        with _sdpa_backend(ctx_name):
            outs = _as_tuple(fwd())
            grads = [torch.randn_like(o) for o in outs]
            ms_f = bench_ms(fwd)
            ms_fb = bench_ms(lambda: torch.autograd.backward(_as_tuple(fwd()), grads), grad_to_none=leaves)
        return {"variant": name, "fwd_ms": ms_f, "fwdbwd_ms": ms_fb,
                "fwd_tflops": flops_fwd / ms_f / 1e9, "fwdbwd_tflops": 3.5 * flops_fwd / ms_fb / 1e9}
    except Exception as exc:  # one unavailable baseline must not lose the other numbers
        return {"variant": name, "error": repr(exc)[:300]}


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def attention_case(kind: str, smoke: bool, device: str, dtype: torch.dtype) -> list[dict]:
    """``kind`` in self / cross / adapter: the fused kernel vs the plain-PyTorch path on SDPA backends."""
    import anima_kernels.attention as attn
    import anima_kernels.flash as flash

    if kind == "self":
        B, H, Lq, Lk, D = (1, 2, 64, 64, 32) if smoke else (4, 16, 4096, 4096, 128)
    elif kind == "cross":
        B, H, Lq, Lk, D = (1, 2, 64, 16, 32) if smoke else (4, 16, 4096, 512, 128)
    else:
        B, H, Lq, Lk, D = (1, 2, 32, 24, 32) if smoke else (4, 16, 512, 512, 64)
    C = H * D
    gen = torch.Generator(device=device).manual_seed(0)
    x_q = torch.randn(B, Lq, C, device=device, dtype=dtype, generator=gen).requires_grad_()
    x_kv = torch.randn(B, Lk, 2 * C, device=device, dtype=dtype, generator=gen).requires_grad_()
    w_q = (1 + 0.1 * torch.randn(D, device=device, generator=gen)).to(dtype).requires_grad_()
    w_k = (1 + 0.1 * torch.randn(D, device=device, generator=gen)).to(dtype).requires_grad_()
    leaves = [x_q, x_kv, w_q, w_k]

    def table(L):
        ang = torch.rand(L, D // 2, device=device, generator=gen) * 100
        full = torch.cat([ang, ang], -1)
        return full.cos(), full.sin()

    kw: dict = {}
    if kind == "self":
        kw["rope_q"] = kw["rope_k"] = table(Lq)
    if kind == "adapter":
        kw["rope_q"], kw["rope_k"] = table(Lq), table(Lk)
        lengths = torch.randint(1, Lk + 1, (B,), device=device, generator=gen)
        kw["key_mask_B_Lk"] = torch.arange(Lk, device=device)[None] < lengths[:, None]

    def split():
        q = x_q.view(B, Lq, H, D)
        k, v = x_kv.view(B, Lk, 2, H, D).unbind(2)
        return q, k, v

    def ours():
        q, k, v = split()
        return attn.qk_norm_rope_attention(q, k, v, w_q, w_k, **kw)

    def ref():
        q, k, v = split()
        return reference.qk_norm_rope_attention(q, k, v, w_q, w_k, use_sdpa=True, **kw)

    def sdpa_only():
        q, k, v = split()
        mask = kw.get("key_mask_B_Lk")
        mask = None if mask is None else mask[:, None, None, :]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    flops = 4 * B * H * Lq * Lk * D
    rows = [_time_variant("ours_fused", ours, leaves, flops)]
    attn.RECOMPUTE_PROLOGUE = False
    rows.append(_time_variant("ours_fused_saved_prologue", ours, leaves, flops))
    attn.RECOMPUTE_PROLOGUE = True
    flash.ATOMIC_DQ = True
    rows.append(_time_variant("ours_fused_atomic_dq", ours, leaves, flops))
    flash.ATOMIC_DQ = False
    for backend in ("cudnn", "flash", None):
        tag = backend or "default"
        rows.append(_time_variant(f"ref_norm_rope+sdpa_{tag}", ref, leaves, flops, backend))
        rows.append(_time_variant(f"sdpa_only_{tag}", sdpa_only, leaves, flops, backend))
    with torch.no_grad():
        err = _rel(ours(), ref())
    for r in rows:
        r.update(case=kind, shape=f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} {str(dtype)[6:]}")
    rows[0]["rel_err_vs_ref"] = err
    return rows


def adaln_case(fused: bool, smoke: bool, device: str, dtype: torch.dtype) -> list[dict]:
    """The adaLN glue kernel vs the eager PyTorch reference (fwd and fwd+bwd, same inputs)."""
    from anima_kernels import adaln

    B, L, C = (1, 16, 64) if smoke else (4, 4096, 2048)
    gen = torch.Generator(device=device).manual_seed(1)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen).requires_grad_()
    x, y = mk(B, L, C), mk(B, L, C)
    gate, shift, scale = mk(B, 1, C), mk(B, 1, C), mk(B, 1, C)
    if fused:
        leaves = [x, gate, y, shift, scale]
        ours = lambda: adaln.gated_residual_modulated_layer_norm(x, gate, y, shift, scale)
        ref = lambda: reference.gated_residual_modulated_layer_norm(x, gate, y, shift, scale)
    else:
        leaves = [x, shift, scale]
        ours = lambda: adaln.modulated_layer_norm(x, shift, scale)
        ref = lambda: reference.modulated_layer_norm(x, shift, scale)
    name = "gated_residual_modulated_ln" if fused else "modulated_ln"
    rows = [_time_variant("ours", ours, leaves, 0), _time_variant("eager_reference", ref, leaves, 0)]
    for r in rows:
        r.update(case=name, shape=f"B{B} L{L} C{C} {str(dtype)[6:]}")
        r.pop("fwd_tflops", None), r.pop("fwdbwd_tflops", None)
    with torch.no_grad():
        rows[0]["rel_err_vs_ref"] = max(_rel(a, b) for a, b in zip(_as_tuple(ours()), _as_tuple(ref())))
    return rows
