"""Forgetting budget decisions on hand-made probe metrics."""

from __future__ import annotations

import pytest

from anima_ft.eval.budget import ForgettingBudget


def m(replay_rel, target=1.0, sigma_rel=None):
    out = {"probe/replay/mean_rel": replay_rel, "probe/replay/mean": replay_rel * 0.5, "probe/target/mean": target}
    if sigma_rel is not None:
        out["probe/replay/sigma_0.4_rel"] = sigma_rel
    return out


def test_stop():
    b = ForgettingBudget(5.0, "stop")
    assert b.update(m(1.0), 0).action == "none"
    d = b.update(m(1.049), 100)
    assert d.action == "none" and d.rise_pct == pytest.approx(4.9) and d.best_step == 100
    d = b.update(m(1.06), 200)
    assert d.action == "stop" and d.best_step == 100 and "+6.00%" in d.reason


def test_lower_lr_then_stop():
    b = ForgettingBudget(5.0, "lower_lr", lr_factor=0.5, max_lr_drops=2, cooldown_probes=2)
    b.update(m(1.0), 0)
    d = b.update(m(1.1), 10)
    assert d.action == "lower_lr" and d.lr_factor == 0.5
    assert b.update(m(1.1), 20).action == "none"  # cooldown: one probe to settle
    assert b.update(m(1.1), 30).action == "lower_lr"
    assert b.update(m(1.1), 40).action == "none"
    assert b.update(m(1.1), 50).action == "stop"  # drops used up
    restored = ForgettingBudget(5.0, "lower_lr", max_lr_drops=2)
    restored.load_state_dict(b.state_dict())
    assert restored.lr_drops == 2 and restored.best_step == 0


def test_mark_best_uses_target_loss_inside_budget():
    b = ForgettingBudget(5.0, "mark_best", target_set="target")
    b.update(m(1.0, target=1.0), 0)
    b.update(m(1.02, target=0.7), 100)
    b.update(m(1.04, target=0.8), 200)  # within budget but worse target
    d = b.update(m(1.2, target=0.5), 300)  # best target but over budget
    assert d.action == "mark_best" and d.best_step == 100


def test_per_sigma_and_errors():
    b = ForgettingBudget(10.0, "stop", sigma=0.4)
    assert b.update(m(1.0, sigma_rel=1.2), 0).action == "stop"
    with pytest.raises(ValueError, match="probe/holdout/mean_rel"):
        ForgettingBudget(5.0, replay_set="holdout").update(m(1.0), 0)
    with pytest.raises(ValueError, match="action"):
        ForgettingBudget(5.0, "explode")
