"""bf16 on the GPU at realistic shapes: every output and gradient vs the float64 oracle (marker ``gpu``).

The interpreter's bf16 dot is unreliable, so bf16 is only checked here. A kernel must be within the bf16 tolerance
of float64 AND no worse than 3x (+1e-3) the error of the plain PyTorch path run in bf16 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from anima_kernels import reference
from kernel_helpers import REL_TOL, assert_close, rel_err
from test_kernel_attention import NAMES, _inputs, _run_pair

pytestmark = pytest.mark.gpu

GPU_CASES = {
    "self_D128_L1000_rope": (2, 1000, 1000, 4, 128, "same", "none"),
    "cross_D128_1031x512": (2, 1031, 512, 4, 128, "none", "none"),
    "adapter_D64_77x300_masked": (2, 77, 300, 4, 64, "separate", "one_empty_row"),
}


def _bf16_reference_errors(tensors64, kwargs, expected):
    """Errors of the plain PyTorch (SDPA) path in bf16 against float64: what bf16 itself costs."""
    ins = [t.to(device="cuda", dtype=torch.bfloat16).requires_grad_() for t in tensors64]
    dev_kwargs = {k: (None if v is None else (tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()))
                  for k, v in kwargs.items()}
    out = reference.qk_norm_rope_attention(*ins, use_sdpa=True, **dev_kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, ins, dout.to(device="cuda", dtype=torch.bfloat16))
    return [rel_err(a.cpu(), e) for a, e in zip((out, *grads), expected)]


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_attention_bf16(case):
    B, Lq, Lk, H, D, rope, mask_kind = GPU_CASES[case]
    tensors, kwargs = _inputs(B, Lq, Lk, H, D, rope, mask_kind, seed=21)
    expected, actual = _run_pair(tensors, kwargs, torch.bfloat16, "cuda")
    base = _bf16_reference_errors(tensors, kwargs, expected)
    for name, a, e, b in zip(NAMES, actual, expected, base):
        assert a.dtype == torch.bfloat16
        assert_close(a.cpu(), e, torch.bfloat16, f"{case}:{name}")
        err = rel_err(a.cpu(), e)
        assert err <= 3 * b + 1e-3, f"{case}:{name}: kernel error {err:.2e} vs plain bf16 PyTorch {b:.2e}"
    mask = kwargs["key_mask_B_Lk"]
    if mask is not None:
        empty_B = ~mask.any(dim=-1)
        assert (actual[0].cpu()[empty_B] == 0).all() and (actual[1].cpu()[empty_B] == 0).all()


@pytest.mark.parametrize("fused", [False, True])
def test_adaln_bf16(fused):
    from anima_kernels.adaln import gated_residual_modulated_layer_norm, modulated_layer_norm

    g = torch.Generator().manual_seed(4)
    B, L, C = 2, 1000, 2048
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64) * 4 + 1
    y = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    vecs = [torch.randn(B, 1, C, generator=g, dtype=torch.float64) * 0.5 for _ in range(3)]
    tensors = [x, vecs[0], y, vecs[1], vecs[2]] if fused else [x, vecs[1], vecs[2]]
    fn_ref = reference.gated_residual_modulated_layer_norm if fused else reference.modulated_layer_norm
    fn_ker = gated_residual_modulated_layer_norm if fused else modulated_layer_norm
    ref_in = [t.clone().requires_grad_() for t in tensors]
    ref = fn_ref(*ref_in)
    ref = ref if isinstance(ref, tuple) else (ref,)
    douts = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    ref_grads = torch.autograd.grad(ref, ref_in, douts)
    ins = [t.to(device="cuda", dtype=torch.bfloat16).requires_grad_() for t in tensors]
    out = fn_ker(*ins)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(out, ins, [d.to(device="cuda", dtype=torch.bfloat16) for d in douts])
    for i, (a, e) in enumerate(zip((*out, *grads), (*ref, *ref_grads))):
        assert_close(a.cpu(), e, torch.bfloat16, f"adaln fused={fused} #{i}")
    assert REL_TOL[torch.bfloat16] <= 2e-2
