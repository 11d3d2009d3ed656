"""Staged schedules: which groups train, at what learning rate, and the replay share, per optimizer step.

A stage of ``n`` steps covering global steps ``[start, start + n)`` with peak LR ``p`` for a group sets, at local
step ``k = step - start`` (0-based, the LR used for the update that produces step ``step + 1``):

    warmup (k < w):  lr = p * (k + 1) / w
    constant:        lr = p
    linear:          lr = p * (m + (1 - m) * (1 - u)),          u = (k - w) / max(1, n - w)
    cosine:          lr = p * (m + (1 - m) * (1 + cos(pi u)) / 2)
with ``m = min_lr_ratio``. A group with ``p = 0`` is frozen for the whole stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from anima_ft.config.schema import PARAM_GROUPS, Config
from anima_ft.config.validate import effective_lrs


@dataclass(frozen=True)
class Stage:
    """One resolved stage."""

    index: int
    name: str
    start: int
    num_steps: int
    peak_lr: dict[str, float]
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    replay_fraction: float  # -1 = keep the configured source weights

    @property
    def end(self) -> int:
        """First global step after this stage."""
        return self.start + self.num_steps

    @property
    def trainable(self) -> frozenset[str]:
        """Groups with a positive learning rate in this stage."""
        return frozenset(g for g, v in self.peak_lr.items() if v > 0)

    def lr_factor(self, step: int) -> float:
        """The schedule multiplier at global ``step`` (inside this stage)."""
        k = step - self.start
        w = self.warmup_steps
        if k < w:
            return (k + 1) / w
        if self.decay == "constant":
            return 1.0
        u = min(1.0, (k - w) / max(1, self.num_steps - w))
        m = self.min_lr_ratio
        if self.decay == "linear":
            return m + (1.0 - m) * (1.0 - u)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * u))

    def lrs(self, step: int) -> dict[str, float]:
        """Learning rate per group at global ``step``."""
        f = self.lr_factor(step)
        return {g: self.peak_lr[g] * f for g in PARAM_GROUPS}


def build_stages(cfg: Config) -> list[Stage]:
    """Resolve ``cfg.stages`` (or the single implicit stage) into contiguous :class:`Stage` objects."""
    lrs = effective_lrs(cfg)
    if not cfg.stages:
        return [Stage(0, "main", 0, cfg.num_steps, lrs[0], 0, "constant", 0.0, -1.0)]
    out, start = [], 0
    for i, (st, peak) in enumerate(zip(cfg.stages, lrs)):
        out.append(
            Stage(i, st.name or f"stage{i}", start, st.num_steps, peak, st.warmup_steps, st.decay,
                  st.min_lr_ratio, st.replay_fraction)
        )
        start += st.num_steps
    return out


def total_steps(stages: list[Stage]) -> int:
    """Optimizer steps over all stages."""
    return stages[-1].end


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs the update at global ``step`` (the last stage once training is over)."""
    for st in stages:
        if step < st.end:
            return st
    return stages[-1]


def source_weights(stage: Stage, base: dict[str, float]) -> dict[str, float]:
    """Data-source weights for ``stage``: ``replay_fraction`` split between target and replay, else ``base``."""
    if stage.replay_fraction < 0:
        return dict(base)
    out = {k: 0.0 for k in base}
    out["target"] = 1.0 - stage.replay_fraction
    out["replay"] = stage.replay_fraction
    return out
