"""One trainer hook that runs the diagnostics when they are due: probe, forgetting budget, drift, sample grid.

The trainer calls ``hooks(step, engine)`` on every rank (``Trainer.eval_hooks``) after each optimizer step and once
at step 0, before the first one (the probe's baseline). The hook returns its numeric metrics (the trainer adds them
to the metrics.jsonl / wandb line; a ``row`` passed in gets them merged too) and keeps the budget's verdict in three attributes the trainer reads after the call:

* ``stop_requested``: True once the forgetting budget says ``stop`` (save a checkpoint and stop);
* ``lr_scale``: product of all LR drops so far (multiply the scheduled LR by it);
* ``best_step``: the best step inside the budget (tag that checkpoint as ``best``).

These are identical on every rank, because every input to them (probe results) is all-reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping

from anima_ft.eval.budget import ForgettingBudget
from anima_ft.eval.drift_tracker import DriftTracker
from anima_ft.eval.probe import ProbeRunner
from anima_ft.eval.sample_grid import SampleGridRunner

logger = logging.getLogger(__name__)


class EvalHooks:
    """Bundle of optional diagnostics run from the training loop (see the module docstring).

    ``log_fn(step, metrics)``, when given, also receives the metrics on steps where ``row`` is not a log line.
    """

    def __init__(self, probe: ProbeRunner | None = None, drift: DriftTracker | None = None,
                 grid: SampleGridRunner | None = None, budget: ForgettingBudget | None = None,
                 log_fn: Callable[[int, dict], None] | None = None) -> None:
        if budget is not None and probe is None:
            raise ValueError("a forgetting budget needs the probe: configure eval sets (with a replay set)")
        self.probe, self.drift, self.grid, self.budget = probe, drift, grid, budget
        self.log_fn = log_fn
        self.stop_requested = False
        self.lr_scale = 1.0
        self.best_step: int | None = None

    def __call__(self, step: int, engine, row: MutableMapping | None = None) -> dict:
        """Run whatever is due at ``step``; returns (and merges into ``row``) the new metrics."""
        metrics: dict = {}
        if self.probe is not None and self.probe.should_run(step):
            probe_metrics = self.probe.run(engine, step)
            metrics.update(probe_metrics)
            if self.budget is not None:
                decision = self.budget.update(probe_metrics, step)
                self.best_step = decision.best_step
                metrics["budget/replay_rise_pct"] = decision.rise_pct
                if decision.action == "stop":
                    self.stop_requested = True
                elif decision.action == "lower_lr":
                    self.lr_scale *= decision.lr_factor
                metrics["budget/lr_scale"] = self.lr_scale
        if self.drift is not None and self.drift.should_run(step):
            metrics.update(self.drift.measure())
        if self.grid is not None and self.grid.should_run(step):
            self.grid.run(engine, step)  # the PNG path is not a number: it goes to the log, not the row
        if row is not None:
            row.update(metrics)
        if self.log_fn is not None and metrics:
            self.log_fn(step, metrics)
        return metrics

    def state_dict(self) -> dict:
        """Probe baseline, budget counters and the hook's verdicts, to save with the training state."""
        return {"probe": None if self.probe is None else self.probe.state_dict(),
                "budget": None if self.budget is None else self.budget.state_dict(),
                "lr_scale": self.lr_scale, "stop_requested": self.stop_requested, "best_step": self.best_step}

    def load_state_dict(self, state: MutableMapping) -> None:
        """Restore :meth:`state_dict` (resume keeps the step-0 baseline and LR drops)."""
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.stop_requested = bool(state.get("stop_requested", False))
        self.best_step = state.get("best_step")
