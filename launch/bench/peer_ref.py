"""The peer reference for the GPU session: the peer's FLOP formula and its numbers (same run, or the stored run).

The peer script (``../shared/bench/peer_baseline.py``, carried as ``.peer/peer_baseline.py``) times diffusers'
``CosmosTransformer3DModel`` (the 2B DiT) and writes ``baseline.json``. Our whole-model numbers are divided by
its numbers and MFU uses its FLOP count, so both sides are measured against the same yardstick.

FLOPs of one 1024^2 training image (fwd + bwd = 3 x fwd; a multiply-add = 2 FLOPs), per DiT block, with S image
tokens, T context tokens, width C, context width Cc and MLP ratio m:

    linear = (4 C^2 [self q,k,v,o] + 2 C^2 [cross q,o] + 2 m C^2 [mlp]) S + 2 Cc C T [cross k,v]
    attn   = 4 S^2 C [self QK^T, PV] + 4 S T C [cross]
    flops  = 3 (2 linear + attn) L

At S 4096, T 512, C 2048, Cc 1024, m 4, L 28 this is 53.76 TFLOP (the peer's ``train_flops_per_image_1024``).
"""

from __future__ import annotations

import json
from pathlib import Path

PEER_SAME_CALL = "same run"
PEER_STORED = "stored run (not this run)"


def flops_per_image(S: int = 4096, T: int = 512, L: int = 28, C: int = 2048, Cc: int = 1024, m: float = 4) -> float:
    """Training FLOPs of one image, the peer's formula (module docstring); defaults are full-size Anima at 1024^2."""
    linear = (4 * C * C + 2 * C * C + m * 2 * C * C) * S + 2 * Cc * C * T
    attn = 4 * S * S * C + 4 * S * T * C
    return 3 * (2 * linear + attn) * L


def _read(path: str | Path | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_peer(same_call: str | Path | None, stored: str | Path | None) -> tuple[dict, str]:
    """``(numbers, label)``: the peer run of this run when its file exists, else the stored run, else ``{}``.

    A same-run file that lacks the DiT section (the peer died after its attention part) is completed with the
    stored run's DiT entries, each marked ``"source": PEER_STORED``.
    """
    now, old = _read(same_call), _read(stored)
    if now is None:
        return (dict(old), PEER_STORED) if old else ({}, "none")
    merged = dict(now)
    for key, value in (old or {}).items():
        if key.startswith("diffusers_dit_") and key not in merged and isinstance(value, dict):
            merged[key] = {**value, "source": PEER_STORED}
    return merged, PEER_SAME_CALL


def peer_dit(peer: dict, label: str, batch: int, ckpt: bool | None, compiled: bool = False) -> tuple[dict, str]:
    """The peer's DiT train-step entry for (batch, checkpointing) or its compiled bs4 entry, and where it came from."""
    key = "diffusers_dit_bs4_compiled" if compiled else f"diffusers_dit_bs{batch}_ckpt{int(bool(ckpt))}"
    entry = peer.get(key) or {}
    return entry, entry.get("source", label) if entry else "none"
