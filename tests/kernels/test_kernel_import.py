"""``import anima_kernels`` works without Triton and without a GPU; the lazy entry points resolve to the kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_NO_TRITON = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
        return None
sys.meta_path.insert(0, _Block())
import anima_kernels, anima_kernels.reference
assert anima_kernels.triton_available() is False, "triton_available() must be False without triton"
try:
    anima_kernels.get_attention()
except ImportError:
    pass
else:
    raise SystemExit("get_attention() should raise ImportError without triton")
print("ok")
"""


def test_import_without_triton():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _NO_TRITON], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_triton_available_needs_gpu_or_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import anima_kernels
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert anima_kernels.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert anima_kernels.triton_available() == torch.cuda.is_available()


def test_lazy_entry_points(device):
    import anima_kernels
    from anima_kernels import adaln, attention

    assert anima_kernels.qk_norm_rope_attention is attention.qk_norm_rope_attention
    assert anima_kernels.get_attention() is attention.qk_norm_rope_attention
    assert anima_kernels.get_adaln() == (adaln.modulated_layer_norm, adaln.gated_residual_modulated_layer_norm)
    assert anima_kernels.gated_residual_modulated_layer_norm is adaln.gated_residual_modulated_layer_norm
    with pytest.raises(AttributeError, match="no_such_kernel"):
        _ = anima_kernels.no_such_kernel
