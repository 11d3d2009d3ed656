"""The trainer's micro-batch stream: the real ``MixedStream`` over pre-encoded shards, or a synthetic fixed dataset.

The synthetic dataset (``data.sources`` empty) exists for tests and smoke runs: ``num_samples`` fixed samples
generated from the run seed (smooth latents, random captions), cycled in order. Global batch ``g`` holds the
``B = M * A * W`` consecutive positions after the previous one and rank ``r`` takes micro-batch ``j = a * W + r``
of it (positions ``j * M ...``), so the stream is a pure function of its start position and the number of
micro-batches consumed. Any new layout continues the same global sequence from a global-batch boundary. It
follows the batch contract (``anima_ft/data/mixer.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from anima_ft.config.schema import Config

logger = logging.getLogger(__name__)


class SyntheticStream:
    """A fixed, seeded dataset of ``num_samples`` samples served as batch-contract micro-batches (see module doc)."""

    def __init__(self, num_samples: int, latent_size: int, num_tokens: int, qwen_dim: int, micro_batch_size: int,
                 grad_accum_steps: int, dp_rank: int, dp_world_size: int, seed: int):
        g = torch.Generator().manual_seed(seed + 12345)
        n, s = num_samples, latent_size
        # smooth latents: a few low-frequency cosines per channel, unit-ish variance (like normalized VAE latents)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        freq = torch.randint(1, 3, (n, 16, 2), generator=g).float()
        phase = torch.rand(n, 16, 1, 1, generator=g) * 6.2832
        self.latents_N_16_s_s = torch.cos(
            freq[..., 0, None, None] * 3.1416 * yy + freq[..., 1, None, None] * 3.1416 * xx + phase
        ) * 1.4
        self.qwen_N_T_C = torch.randn(n, num_tokens, qwen_dim, generator=g)
        self.t5_N_T = torch.randint(2, 32000, (n, num_tokens), generator=g)
        self.num_samples, self.micro, self.accum = n, micro_batch_size, grad_accum_steps
        self.rank, self.world = dp_rank, dp_world_size
        self.start = 0  # global position of the first global batch of this layout
        self.consumed = 0  # micro-batches this rank has taken since then

    def _indices(self, j: int) -> list[int]:
        a, i = divmod(j, self.accum)
        start = self.start + ((a * self.accum + i) * self.world + self.rank) * self.micro
        return [(start + b) % self.num_samples for b in range(self.micro)]

    def _layout(self) -> dict:
        return {"micro_batch_size": self.micro, "grad_accum_steps": self.accum, "world_size": self.world,
                "dp_rank": self.rank}

    def __iter__(self) -> Iterator[dict]:
        while True:
            idx = self._indices(self.consumed)
            self.consumed += 1
            B, T = len(idx), self.qwen_N_T_C.shape[1]
            yield {
                "latents": self.latents_N_16_s_s[idx].clone(),
                "qwen_states": self.qwen_N_T_C[idx].clone(),
                "qwen_mask": torch.ones(B, T, dtype=torch.bool),
                "t5_ids": self.t5_N_T[idx].clone(),
                "t5_mask": torch.ones(B, T, dtype=torch.bool),
                "source": ["synthetic"] * B,
                "source_id": torch.zeros(B, dtype=torch.long),
                "caption": [f"synthetic {i}" for i in idx],
                "key": [f"{i:06d}" for i in idx],
            }

    def set_weights(self, weights: dict[str, float]) -> None:
        """No-op: the synthetic dataset has one source."""

    def state_dict(self) -> dict:
        """The position in the stream: start, micro-batches consumed since, and the layout they assume."""
        return {"consumed": self.consumed, "start": self.start, "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of this layout (or of any layout, at a global-batch boundary)."""
        layout = state.get("layout", self._layout())  # states written before the layout was stored: same layout
        if layout == self._layout():
            self.start, self.consumed = int(state.get("start", 0)), int(state["consumed"])
            return
        self.load_state_dicts([state])

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the per-rank states of a run with another layout (world size, accumulation or micro-batch
        size), at the same global position; exact for any layout. Refuses a state saved inside a global batch."""
        consumed = {int(s["consumed"]) for s in states}
        layout = states[0]["layout"]
        if len(consumed) != 1 or any(s.get("start", 0) != states[0].get("start", 0) for s in states):
            raise ValueError(f"the saved ranks are at different stream positions ({sorted(consumed)}); the "
                             "checkpoint is inconsistent")
        n = consumed.pop()
        if n % layout["grad_accum_steps"]:
            raise ValueError(f"the synthetic stream was saved inside a global batch ({n} micro-batches with "
                             f"grad_accum_steps={layout['grad_accum_steps']}); resume it with its saved layout")
        self.start = int(states[0].get("start", 0)) + n * layout["world_size"] * layout["micro_batch_size"]
        self.consumed = 0
        logger.info("synthetic data: continuing at global position %d with layout %s (saved: %s)", self.start,
                    self._layout(), layout)

    def stats(self) -> dict:
        """Counters in the ``MixedStream.stats`` layout."""
        return {"seen": {"synthetic": self.consumed * self.micro}, "skipped": {}}


def source_names(cfg: Config) -> list[str]:
    """Names of the sources a batch's ``source`` list can hold, in a fixed order."""
    return [s.name for s in cfg.data.sources] or ["synthetic"]


def build_stream(cfg: Config, qwen_dim: int, dp_rank: int, dp_world_size: int):
    """The micro-batch stream for this rank: ``MixedStream`` over ``data.sources``, or the synthetic dataset."""
    b, d = cfg.batch, cfg.data
    if not d.sources:
        logger.warning("data.sources is empty: training on the synthetic dataset (%d samples)", d.synthetic_num_samples)
        return SyntheticStream(d.synthetic_num_samples, d.synthetic_latent_size, d.synthetic_num_tokens, qwen_dim,
                               b.micro_batch_size, b.grad_accum_steps, dp_rank, dp_world_size, cfg.run.seed)
    from anima_ft.data import MixedStream, SourceSpec

    specs = [SourceSpec(s.name, list(s.shards), s.weight) for s in d.sources]
    return MixedStream(specs, micro_batch_size=b.micro_batch_size, grad_accum_steps=b.grad_accum_steps,
                       dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=d.num_workers, seed=cfg.run.seed,
                       caption_dropout=d.caption_dropout, expected_fingerprint=d.expected_fingerprint or None,
                       remote=d.remote)
