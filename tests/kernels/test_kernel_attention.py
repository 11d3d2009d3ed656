"""Fused q/k-norm + RoPE + flash attention vs the float64 plain-PyTorch oracle (forward and every gradient).

Runs under TRITON_INTERPRET=1 on CPU (fp32 / fp16; the interpreter's bf16 dot is unreliable) and on a GPU as-is.
"""

from __future__ import annotations

import pytest
import torch
from anima_kernels import reference
from kernel_helpers import assert_close, rope_table

CASES = {
    # name: (B, Lq, Lk, H, D, rope, mask)   rope: none / same (self-attn table) / separate (adapter position spaces)
    "self_L1": (1, 1, 1, 2, 16, "same", "none"),
    "self_L7": (2, 7, 7, 2, 16, "same", "none"),
    "self_L33_D32": (1, 33, 33, 2, 32, "same", "none"),
    "self_D24_padded": (1, 9, 9, 2, 24, "same", "none"),
    "self_L32_even_tiles": (1, 32, 32, 2, 16, "same", "none"),  # no key masking at all (MASK_KEYS False)
    "cross_33x7": (2, 33, 7, 2, 32, "none", "none"),
    "cross_7x33_masked": (2, 7, 33, 2, 16, "none", "random"),
    "cross_5x70_masked_big_tile": (1, 5, 70, 2, 16, "none", "random"),
    "adapter_7x33": (2, 7, 33, 2, 32, "separate", "one_empty_row"),
    "adapter_33x7": (2, 33, 7, 2, 16, "separate", "tail_valid"),
    "adapter_all_masked": (2, 7, 5, 2, 16, "separate", "all_masked"),
}


def _mask(kind: str, B: int, Lk: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "random":
        m = torch.rand(B, Lk, generator=g) > 0.3
        m[:, 0] = True
        return m
    if kind == "one_empty_row":  # sample 0 has no valid key at all: its rows must give exactly 0
        m = torch.rand(B, Lk, generator=g) > 0.5
        m[0] = False
        m[1, 3] = True
        return m
    if kind == "tail_valid":  # only the last keys valid: early key tiles are fully masked for every row
        m = torch.zeros(B, Lk, dtype=torch.bool)
        m[:, -2:] = True
        return m
    assert kind == "all_masked"
    return torch.zeros(B, Lk, dtype=torch.bool)


def _inputs(B, Lq, Lk, H, D, rope, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64)
    w_q = 1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)
    w_k = 1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)
    rope_q = rope_k = None
    if rope == "same":
        rope_q = rope_k = rope_table(Lq, D, seed=2)
    elif rope == "separate":
        rope_q, rope_k = rope_table(Lq, D, seed=3), rope_table(Lk, D, seed=4)
    return (q, k, v, w_q, w_k), dict(rope_q=rope_q, rope_k=rope_k, key_mask_B_Lk=_mask(mask_kind, B, Lk))


def _run_pair(tensors64, kwargs, dtype, device, prepare=None):
    """Reference in float64 on CPU and the kernel in ``dtype`` on ``device``; returns (ref, out) outputs + grads."""
    from anima_kernels.attention import qk_norm_rope_attention

    ref_in = [t.clone().requires_grad_() for t in tensors64]
    ref = reference.qk_norm_rope_attention(*ref_in, use_sdpa=False, **kwargs)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ker_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors64]
    dev_kwargs = {
        "rope_q": None if kwargs["rope_q"] is None else tuple(t.to(device) for t in kwargs["rope_q"]),
        "rope_k": None if kwargs["rope_k"] is None else tuple(t.to(device) for t in kwargs["rope_k"]),
        "key_mask_B_Lk": None if kwargs["key_mask_B_Lk"] is None else kwargs["key_mask_B_Lk"].to(device),
    }
    q, k, v = prepare(*ker_in[:3]) if prepare is not None else ker_in[:3]
    out = qk_norm_rope_attention(q, k, v, *ker_in[3:], **dev_kwargs)
    grads = torch.autograd.grad(out, ker_in, dout.to(device=device, dtype=dtype))
    return (ref, *ref_grads), (out, *grads)


NAMES = ("out", "dq", "dk", "dv", "dw_q", "dw_k")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, device):
    B, Lq, Lk, H, D, rope, mask_kind = CASES[case]
    tensors, kwargs = _inputs(B, Lq, Lk, H, D, rope, mask_kind)
    expected, actual = _run_pair(tensors, kwargs, torch.float32, device)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a.cpu(), e, torch.float32, f"{case}:{name}")
    mask = kwargs["key_mask_B_Lk"]
    if mask is not None:
        empty_B = ~mask.any(dim=-1)
        # Rows with no valid key: output and the q gradient exactly 0 (docs/model.md#pitfall-3).
        assert (actual[0].cpu()[empty_B] == 0).all()
        assert (actual[1].cpu()[empty_B] == 0).all()
        assert (actual[2].cpu()[empty_B] == 0).all() and (actual[3].cpu()[empty_B] == 0).all()


@pytest.mark.parametrize("case", ["self_L33_D32", "adapter_7x33"])
def test_matches_reference_fp16(case, device):
    B, Lq, Lk, H, D, rope, mask_kind = CASES[case]
    tensors, kwargs = _inputs(B, Lq, Lk, H, D, rope, mask_kind, seed=5)
    expected, actual = _run_pair(tensors, kwargs, torch.float16, device)
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype == torch.float16
        assert_close(a.cpu(), e, torch.float16, f"{case}:{name}")


def test_strided_qkv_views(device):
    """q, k, v as ``unbind`` views of one packed projection (non-contiguous, head dim contiguous)."""
    B, L, H, D = 2, 9, 2, 16
    tensors, kwargs = _inputs(B, L, L, H, D, "same", "none", seed=9)

    def pack(q, k, v):
        qkv = torch.stack([q, k, v], dim=2)  # [B, L, 3, H, D]
        q2, k2, v2 = qkv.unbind(2)
        assert not q2.is_contiguous()
        return q2, k2, v2

    expected, actual = _run_pair(tensors, kwargs, torch.float32, device, prepare=pack)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a.cpu(), e, torch.float32, f"strided:{name}")


def test_saved_prologue_path_matches(device, monkeypatch):
    """``RECOMPUTE_PROLOGUE = False`` (save q', k') gives the same gradients as the recomputing default."""
    import anima_kernels.attention as attn

    tensors, kwargs = _inputs(1, 7, 12, 2, 16, "separate", "random", seed=11)
    monkeypatch.setattr(attn, "RECOMPUTE_PROLOGUE", False)
    expected, actual = _run_pair(tensors, kwargs, torch.float32, device)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a.cpu(), e, torch.float32, f"saved:{name}")


@pytest.mark.parametrize("case", ["self_L33_D32", "adapter_7x33", "adapter_33x7", "cross_5x70_masked_big_tile"])
def test_atomic_dq_backward_matches(case, device, monkeypatch):
    """``flash.ATOMIC_DQ = True`` (dq added by the dk/dv kernel with atomics) gives the same gradients."""
    import anima_kernels.flash as flash

    B, Lq, Lk, H, D, rope, mask_kind = CASES[case]
    tensors, kwargs = _inputs(B, Lq, Lk, H, D, rope, mask_kind, seed=13)
    monkeypatch.setattr(flash, "ATOMIC_DQ", True)
    expected, actual = _run_pair(tensors, kwargs, torch.float32, device)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a.cpu(), e, torch.float32, f"atomic:{case}:{name}")


def test_prologue_matches_rmsnorm_then_rope(device):
    """The prologue kernel alone equals ``apply_rope(rms_norm(x) * w)`` from the reference."""
    from anima_kernels.qk_prologue import norm_rope_forward

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 32, generator=g, dtype=torch.float64)
    w = torch.randn(32, generator=g, dtype=torch.float64)
    cos, sin = rope_table(5, 32, seed=1)
    expected = reference.apply_rope(reference.rms_norm(x, w, 1e-6), cos, sin)
    y, rstd = norm_rope_forward(x.float().to(device), w.float().to(device), (cos.to(device), sin.to(device)), 1e-6)
    assert_close(y.cpu(), expected, torch.float32, "prologue")
    expected_rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6).reshape(-1)
    assert_close(rstd.cpu(), expected_rstd, torch.float32, "rstd")


@pytest.mark.parametrize(
    "change, match",
    [
        ("weight", "q_norm_weight"),
        ("rope", "rope_q cos"),
        ("mask", "key_mask_B_Lk"),
        ("dtype", "share one dtype"),
        ("half_double", "share one dtype"),
        ("kv", "k and v"),
    ],
)
def test_bad_inputs_raise(change, match, device):
    from anima_kernels.attention import qk_norm_rope_attention

    q = torch.randn(1, 4, 2, 16, device=device)
    k = v = torch.randn(1, 5, 2, 16, device=device)
    w = torch.ones(16, device=device)
    kwargs = {}
    w_q = w
    if change == "weight":
        w_q = torch.ones(8, device=device)
    elif change == "rope":
        kwargs["rope_q"] = tuple(t.to(device) for t in rope_table(3, 16))
    elif change == "mask":
        kwargs["key_mask_B_Lk"] = torch.ones(1, 4, dtype=torch.bool, device=device)
    elif change == "dtype":
        v = v.double()
    elif change == "half_double":
        q, k = q.double(), k.double()
    elif change == "kv":
        v = torch.randn(1, 6, 2, 16, device=device)
    with pytest.raises(ValueError, match=match):
        qk_norm_rope_attention(q, k, v, w_q, w, **kwargs)


def test_float64_falls_back_to_reference(device, caplog, monkeypatch):
    import anima_kernels

    monkeypatch.setattr(anima_kernels, "_warned", set())  # warn-once state must not leak between tests
    from anima_kernels.attention import qk_norm_rope_attention

    tensors, kwargs = _inputs(2, 5, 6, 2, 16, "separate", "one_empty_row", seed=17)
    tensors = [t.to(device) for t in tensors]
    kwargs = {k: (None if v is None else tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device))
              for k, v in kwargs.items()}
    with caplog.at_level("WARNING", logger="anima_kernels"):
        out = qk_norm_rope_attention(*tensors, **kwargs)
    assert torch.equal(out, reference.qk_norm_rope_attention(*tensors, use_sdpa=False, **kwargs))
    assert any("float64" in r.getMessage() for r in caplog.records)
