"""Forgetting budget: act when the replay-set probe loss rises more than ``max_rise_pct`` above its step-0 value.

The budget reads the metrics of :class:`anima_ft.eval.probe.ProbeRunner` (``probe/<set>/mean_rel`` or
``probe/<set>/sigma_<s>_rel``, i.e. loss / step-0 loss) after every probe and returns a :class:`BudgetDecision`; the
trainer carries it out. Actions:

* ``stop``: stop training at the first breach.
* ``lower_lr``: multiply every LR by ``lr_factor`` at a breach, at most once every ``cooldown_probes`` probes, and at
  most ``max_lr_drops`` times; a breach after the last drop's cooldown stops training.
* ``mark_best``: never interrupts; keeps track of the best step inside the budget (lowest ``target_set`` loss, or,
  without a target set, the latest step inside the budget) so the trainer can tag that checkpoint as ``best``.

Every decision carries ``best_step``, so all three modes can also export the best checkpoint at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from anima_ft.eval.probe import sigma_label

logger = logging.getLogger(__name__)

ACTIONS = ("stop", "lower_lr", "mark_best")


@dataclass
class BudgetDecision:
    """What the trainer should do after a probe.

    action: ``none``, ``stop``, ``lower_lr`` or ``mark_best``. ``lr_factor``: multiply LRs by this when
    ``action == "lower_lr"``. ``rise_pct``: replay loss rise over step 0, in percent. ``best_step``: the best step
    inside the budget so far (None before the first probe). ``reason``: a log line.
    """

    action: str
    rise_pct: float
    best_step: int | None
    lr_factor: float = 1.0
    reason: str = ""


class ForgettingBudget:
    """Watch ``probe/<replay_set>/...`` and decide stop / lower LR / mark best (see the module docstring).

    ``sigma=None`` uses the mean over the probe sigmas, otherwise the given sigma's curve.
    """

    def __init__(self, max_rise_pct: float, action: str = "stop", replay_set: str = "replay",
                 target_set: str | None = None, sigma: float | None = None, lr_factor: float = 0.5,
                 max_lr_drops: int = 3, cooldown_probes: int = 1) -> None:
        if max_rise_pct <= 0:
            raise ValueError(f"max_rise_pct={max_rise_pct} must be > 0 (percent rise over step 0, e.g. 5.0)")
        if action not in ACTIONS:
            raise ValueError(f"forgetting budget action {action!r}; choose one of {ACTIONS}")
        if not 0.0 < lr_factor < 1.0:
            raise ValueError(f"lr_factor={lr_factor} must be in (0, 1)")
        self.max_rise_pct = max_rise_pct
        self.action = action
        self.replay_set = replay_set
        self.target_set = target_set
        self.suffix = "mean" if sigma is None else sigma_label(sigma)
        self.lr_factor = lr_factor
        self.max_lr_drops = max_lr_drops
        self.cooldown_probes = max(1, cooldown_probes)
        self.lr_drops = 0
        self.probes_since_drop = self.cooldown_probes
        self.best_step: int | None = None
        self.best_target: float | None = None

    def _metric(self, metrics: Mapping[str, float], name: str, rel: bool) -> float:
        key = f"probe/{name}/{self.suffix}" + ("_rel" if rel else "")
        if key not in metrics:
            raise ValueError(f"forgetting budget needs metric {key!r}, but the probe logged {sorted(metrics)[:8]}...; "
                             f"add an eval set named {name!r} to the probe")
        return float(metrics[key])

    def update(self, metrics: Mapping[str, float], step: int) -> BudgetDecision:
        """Consume one probe's metrics (from ``ProbeRunner.run``) at ``step`` and return the decision."""
        rise = 100.0 * (self._metric(metrics, self.replay_set, rel=True) - 1.0)
        within = rise <= self.max_rise_pct
        if within:
            if self.target_set is None:
                self.best_step = step
            else:
                target = self._metric(metrics, self.target_set, rel=False)
                if self.best_target is None or target < self.best_target:
                    self.best_step, self.best_target = step, target
        self.probes_since_drop += 1
        msg = f"replay loss {rise:+.2f}% vs step 0 (budget {self.max_rise_pct:g}%) at step {step}"
        if within:
            return BudgetDecision("none", rise, self.best_step, reason=msg)
        if self.action == "mark_best":
            return BudgetDecision("mark_best", rise, self.best_step, reason=msg + f"; best step {self.best_step}")
        if self.action == "lower_lr" and self.lr_drops > 0 and self.probes_since_drop < self.cooldown_probes:
            return BudgetDecision("none", rise, self.best_step, reason=msg + "; in LR-drop cooldown")
        if self.action == "lower_lr" and self.lr_drops < self.max_lr_drops:
            self.lr_drops += 1
            self.probes_since_drop = 0
            logger.warning("forgetting budget exceeded: %s; LR x%g (drop %d/%d)", msg, self.lr_factor,
                           self.lr_drops, self.max_lr_drops)
            return BudgetDecision("lower_lr", rise, self.best_step, self.lr_factor, msg)
        logger.warning("forgetting budget exceeded: %s; stopping", msg)
        return BudgetDecision("stop", rise, self.best_step, reason=msg + "; stop")

    def state_dict(self) -> dict:
        """Counters and the best step, to keep across restarts."""
        return {"lr_drops": self.lr_drops, "probes_since_drop": self.probes_since_drop, "best_step": self.best_step,
                "best_target": self.best_target}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.lr_drops = int(state["lr_drops"])
        self.probes_since_drop = int(state["probes_since_drop"])
        self.best_step = state["best_step"]
        self.best_target = state["best_target"]
