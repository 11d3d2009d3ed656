"""Shared helpers for the eval tests (tiny eval sets, randomized tiny models)."""

from __future__ import annotations

import torch

from anima_ft.eval.eval_sets import EvalSample


def make_samples(prefix: str = "img", n: int = 3, source_dim: int = 32, seed: int = 0) -> list[EvalSample]:
    """``n`` samples with mixed latent sizes and caption lengths (the last one has an empty caption)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(4, 4), (4, 6), (6, 4), (4, 4)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        s = 0 if i == n - 1 else 3 + i
        t5 = torch.tensor([1]) if s == 0 else torch.cat([torch.randint(2, 100, (2 + i,), generator=gen), torch.tensor([1])])
        out.append(EvalSample(key=f"{prefix}{i}", latents=torch.randn(16, h, w, generator=gen),
                              qwen_states=torch.randn(s, source_dim, generator=gen), t5_ids=t5, caption=f"c{i}"))
    return out


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (so zero-init adaLN/gates do not hide anything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale
                    + (1.0 if p.dim() == 1 else 0.0))
    return model


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded relative noise to every parameter (a stand-in for training steps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale * (p.detach().abs().mean() + 1e-3))


def reference_drift(start: dict, now: dict) -> dict[str, float]:
    """Coarse drift metrics by direct float64 concatenation of each LR group's tensors (grouped per tensor, while
    the tracker sums drift groups: the two agree only if every drift group lies inside one LR group)."""
    from anima_ft.model.groups import lr_group

    kinds: dict[str, list[str]] = {}
    for n in start:
        kinds.setdefault(lr_group(n), []).append(n)
    kinds["total"] = list(start)
    out = {}
    for k, names in kinds.items():
        a = torch.cat([start[n].double().flatten() for n in names])
        b = torch.cat([now[n].detach().double().flatten() for n in names])
        out[f"drift/{k}/rel"] = float((b - a).norm() / a.norm())
        out[f"drift/{k}/cos"] = float((a @ b) / (a.norm() * b.norm()))
    return out
