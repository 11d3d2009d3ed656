"""Tiny caption-conditional data and a caption-sensitive teacher for the distillation tests.

Data: ``num_classes`` latent patterns P_c [16, 8, 8] (smooth random cosines); a sample of class c with caption
variant j has latents P_c + 0.1 n and the caption "word_c word_j </s>": T5 ids ``[10 + c, 100 + j, 1]`` and Qwen
states ``E_c + 0.5 F_j`` (two tokens, fixed Gaussian tables). Held-out captions use variants the training never saw.
The teacher is the tiny Anima trained with the plain flow loss on this data, so its velocity depends on the caption
through its adapter.
"""

from __future__ import annotations

import torch

from anima_ft.config.schema import ObjectiveConfig
from anima_ft.model import AnimaConfig, build_anima
from anima_ft.train.objective import compute_loss

QWEN_DIM = 32


class CaptionData:
    """Fixed tables; ``batch(classes, variants, source, gen)`` builds a batch-contract micro-batch."""

    def __init__(self, num_classes: int = 4, num_variants: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij")
        freq = torch.randint(1, 4, (num_classes, 16, 2), generator=g).float()
        phase = torch.rand(num_classes, 16, 1, 1, generator=g) * 6.2832
        self.patterns = torch.cos(freq[..., 0, None, None] * 3.1416 * yy + freq[..., 1, None, None] * 3.1416 * xx
                                  + phase) * 1.4  # [K, 16, 8, 8]
        self.E = torch.randn(num_classes, QWEN_DIM, generator=g)
        self.F = torch.randn(num_variants, QWEN_DIM, generator=g)
        self.num_classes, self.num_variants = num_classes, num_variants

    def batch(self, classes: list[int], variants: list[int], source: str | list[str],
              gen: torch.Generator | None = None) -> dict:
        """A micro-batch (batch contract) of the given (class, caption variant) pairs."""
        B = len(classes)
        c, j = torch.tensor(classes), torch.tensor(variants)
        noise = torch.randn(B, 16, 8, 8, generator=gen) if gen is not None else torch.zeros(B, 16, 8, 8)
        qwen = torch.stack([self.E[c], self.E[c] + 0.5 * self.F[j]], dim=1)  # [B, 2, 32]
        t5 = torch.stack([10 + c, 100 + j, torch.ones_like(c)], dim=1)  # [B, 3]
        sources = [source] * B if isinstance(source, str) else list(source)
        return {
            "latents": self.patterns[c] + 0.1 * noise,
            "qwen_states": qwen,
            "qwen_mask": torch.ones(B, 2, dtype=torch.bool),
            "t5_ids": t5,
            "t5_mask": torch.ones(B, 3, dtype=torch.bool),
            "source": sources,
            "source_id": torch.zeros(B, dtype=torch.long),
            "caption": [f"class {a} variant {b}" for a, b in zip(classes, variants)],
            "key": [f"c{a}v{b}n{k}" for k, (a, b) in enumerate(zip(classes, variants))],
        }

    def random_batch(self, B: int, variants: list[int], source, gen: torch.Generator) -> dict:
        """B samples with random classes and caption variants drawn from ``variants``."""
        c = torch.randint(self.num_classes, (B,), generator=gen).tolist()
        j = [variants[i] for i in torch.randint(len(variants), (B,), generator=gen).tolist()]
        return self.batch(c, j, source, gen)


def tiny_model(seed: int = 0):
    """The tiny Anima (2 DiT blocks, 2-layer adapter) in float32."""
    return build_anima(AnimaConfig.tiny(), device="cpu", dtype=torch.float32, seed=seed)


def train_teacher(data: CaptionData, steps: int = 120, lr: float = 3e-3, batch_size: int = 8, seed: int = 0):
    """The tiny Anima trained with the plain flow loss on training caption variants (0..num_variants-3)."""
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    train_variants = list(range(data.num_variants - 2))
    cfg = ObjectiveConfig(timestep_sampling="uniform")
    for step in range(steps):
        batch = data.random_batch(batch_size, train_variants, "target", gen)
        out = compute_loss(model, batch, torch.Generator().manual_seed(1000 + step), cfg)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return model.eval()
