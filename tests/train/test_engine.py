"""Engine helpers (train/engine.py): materialized optimizer state equals AdamW's lazy init."""

from __future__ import annotations

import torch


def test_materialized_state_equals_adamw_lazy_init():
    """``materialize_state`` creates exactly the state AdamW would create at its first step (so results match)."""
    from types import SimpleNamespace

    from anima_ft.train.engine import materialize_state, set_lrs

    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 3))
        opt = torch.optim.AdamW([{"params": [p], "name": "mlp/decay", "group": "mlp", "lr": 0.1,
                                  "weight_decay": 0.01}], foreach=False)
        return p, opt

    p_ref, opt_ref = make()
    p, opt = make()
    engine = SimpleNamespace(optimizer=opt)
    materialize_state(engine, ema=True)
    assert torch.equal(opt.state[p]["ema"], p.detach())
    set_lrs(engine, {"mlp": 0.05})
    opt_ref.param_groups[0]["lr"] = 0.05
    for k in range(3):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(k))
        for param, o in ((p_ref, opt_ref), (p, opt)):
            param.grad = g.clone()
            o.step()
    assert torch.equal(p, p_ref)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[p][key], opt_ref.state[p_ref][key]), key
