"""adaLN glue kernels vs the float64 plain-PyTorch oracle: outputs and the gradient of every tensor input."""

from __future__ import annotations

import pytest
import torch
from anima_kernels import reference
from kernel_helpers import assert_close

SHAPES = [(1, 1, 5), (2, 7, 48), (1, 33, 64), (3, 10, 130)]  # odd C (padding), L below / above the row tile


def _vectors(B, C, g, n):
    return [torch.randn(B, 1, C, generator=g, dtype=torch.float64) * 0.5 for _ in range(n)]


def _check(fn_kernel, fn_ref, tensors64, n_out, dtype, device, tag):
    ref_in = [t.clone().requires_grad_() for t in tensors64]
    ref = fn_ref(*ref_in)
    ref = ref if isinstance(ref, tuple) else (ref,)
    g = torch.Generator().manual_seed(5)
    douts = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    ref_grads = torch.autograd.grad(ref, ref_in, douts)
    ker_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors64]
    out = fn_kernel(*ker_in)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == n_out
    grads = torch.autograd.grad(out, ker_in, [d.to(device=device, dtype=dtype) for d in douts])
    for i, (a, e) in enumerate(zip(out, ref)):
        assert a.dtype == dtype
        assert_close(a.cpu(), e, dtype, f"{tag}:out{i}")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert a.shape == ker_in[i].shape
        assert_close(a.cpu(), e, dtype, f"{tag}:grad{i}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_modulated_layer_norm(shape, dtype, device):
    from anima_kernels.adaln import modulated_layer_norm

    B, L, C = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64) * 3 + 1  # offset + scale: exercises the mean
    shift, scale = _vectors(B, C, g, 2)
    _check(modulated_layer_norm, reference.modulated_layer_norm, [x, shift, scale], 1, dtype, device, "mln")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_residual_modulated_layer_norm(shape, dtype, device):
    from anima_kernels.adaln import gated_residual_modulated_layer_norm

    B, L, C = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    gate, shift, scale = _vectors(B, C, g, 3)
    _check(gated_residual_modulated_layer_norm, reference.gated_residual_modulated_layer_norm,
           [x, gate, y, shift, scale], 2, dtype, device, "grmln")


def test_gated_residual_h_only_gradient(device):
    """Only ``h`` used downstream (``x_new`` discarded): the missing ``dx_new`` is treated as zero."""
    from anima_kernels.adaln import gated_residual_modulated_layer_norm

    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(2, 9, 32, generator=g, dtype=torch.float64) for _ in range(2))
    gate, shift, scale = _vectors(2, 32, g, 3)
    ref_in = [t.clone().requires_grad_() for t in (x, gate, y, shift, scale)]
    _, h_ref = reference.gated_residual_modulated_layer_norm(*ref_in)
    dh = torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(h_ref, ref_in, dh)
    ker_in = [t.float().to(device).requires_grad_() for t in (x, gate, y, shift, scale)]
    _, h = gated_residual_modulated_layer_norm(*ker_in)
    grads = torch.autograd.grad(h, ker_in, dh.float().to(device))
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a.cpu(), e, torch.float32, f"h_only:grad{i}")


def test_broadcast_vectors_and_eps(device):
    """Shift/scale given once for the batch ([1, 1, C]) and a non-default eps match the reference."""
    from anima_kernels.adaln import modulated_layer_norm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * 0.01  # small variance: eps matters
    shift, scale = _vectors(1, 16, g, 2)
    fn_ref = lambda a, b, c: reference.modulated_layer_norm(a, b, c, eps=1e-3)
    fn_ker = lambda a, b, c: modulated_layer_norm(a, b, c, eps=1e-3)
    _check(fn_ker, fn_ref, [x, shift, scale], 1, torch.float32, device, "bcast")


@pytest.mark.parametrize("bad", ["per_frame", "channels", "x_rank"])
def test_bad_shapes_raise(bad, device):
    from anima_kernels.adaln import modulated_layer_norm

    x = torch.randn(2, 6, 8, device=device)
    vec = torch.randn(2, 1, 8, device=device)
    if bad == "per_frame":
        with pytest.raises(ValueError, match="shift_B_1_C"):
            modulated_layer_norm(x, torch.randn(2, 3, 8, device=device), vec)
    elif bad == "channels":
        with pytest.raises(ValueError, match="scale_B_1_C"):
            modulated_layer_norm(x, vec, torch.randn(2, 1, 4, device=device))
    else:
        with pytest.raises(ValueError, match="x_B_L_C"):
            modulated_layer_norm(x[0], vec, vec)


def test_float64_falls_back_to_reference_with_one_warning(device, caplog, monkeypatch):
    import anima_kernels

    monkeypatch.setattr(anima_kernels, "_warned", set())  # warn-once state must not leak between tests
    from anima_kernels.adaln import gated_residual_modulated_layer_norm, modulated_layer_norm

    g = torch.Generator().manual_seed(6)
    x, y = (torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    gate, shift, scale = (v.to(device) for v in _vectors(2, 16, g, 3))
    with caplog.at_level("WARNING", logger="anima_kernels"):
        for _ in range(2):
            h = modulated_layer_norm(x, shift, scale)
            pair = gated_residual_modulated_layer_norm(x, gate, y, shift, scale)
    assert torch.equal(h, reference.modulated_layer_norm(x, shift, scale))
    for a, e in zip(pair, reference.gated_residual_modulated_layer_norm(x, gate, y, shift, scale)):
        assert torch.equal(a, e)
    msgs = [r.getMessage() for r in caplog.records if "float64" in r.getMessage()]
    assert len(msgs) == 2, msgs  # one per function, not one per call
