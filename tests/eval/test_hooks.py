"""EvalHooks: probe at step 0 and every N, drift merged into the row, budget verdicts surface to the trainer."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import make_samples, perturb_, randomize_

from anima_ft.eval import DriftTracker, ForgettingBudget, ProbeRunner
from anima_ft.eval.hooks import EvalHooks


def test_hooks_probe_drift_budget():
    from anima_ft.model import AnimaConfig, build_anima

    model = randomize_(build_anima(AnimaConfig.tiny(), seed=0), seed=2)
    probe = ProbeRunner({"replay": make_samples("r", 2)}, sigmas=(0.5,), num_noises=2, every_steps=10)
    logged = []
    hooks = EvalHooks(probe, DriftTracker(model, every_steps=5), budget=ForgettingBudget(1.0, "lower_lr", lr_factor=0.5),
                      log_fn=lambda s, m: logged.append((s, m)))
    row: dict = {}
    m0 = hooks(0, model, row)
    assert row["probe/replay/sigma_0.5_rel"] == 1.0 and row["drift/total/rel"] == 0.0
    assert m0["budget/replay_rise_pct"] == 0.0 and hooks.lr_scale == 1.0 and hooks.best_step == 0
    assert hooks(5, model, {}).keys() >= {"drift/total/rel"} and "probe/replay/mean" not in hooks(5, model, {})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # a big change: the probe loss moves far outside a 1% budget
    perturb_(model, seed=1)
    m10 = hooks(10, model, None)
    rise = 100 * (m10["probe/replay/mean_rel"] - 1)
    assert m10["budget/replay_rise_pct"] == pytest.approx(rise) and rise > 1.0
    assert hooks.lr_scale == 0.5 and m10["budget/lr_scale"] == 0.5 and hooks.best_step == 0 and not hooks.stop_requested
    assert logged[0][0] == 0 and logged[-1][0] == 10
    fresh = EvalHooks(ProbeRunner({"replay": make_samples("r", 2)}, sigmas=(0.5,), num_noises=2),
                      budget=ForgettingBudget(1.0, "lower_lr"))
    fresh.load_state_dict(hooks.state_dict())
    assert fresh.lr_scale == hooks.lr_scale and fresh.probe.baseline == probe.baseline


def test_budget_without_probe_is_an_error():
    with pytest.raises(ValueError, match="replay"):
        EvalHooks(budget=ForgettingBudget(5.0))
