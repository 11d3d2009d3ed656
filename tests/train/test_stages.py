"""Staged schedules (train/stages.py): LR formulas, stage boundaries, replay weights."""

from __future__ import annotations

import math

import pytest

from anima_ft.config import load_config
from anima_ft.config.schema import PARAM_GROUPS
from anima_ft.train.stages import build_stages, source_weights, stage_at


def test_stage_schedule_formulas(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "optim: {lr: {mlp: 1.0}}\nstages:\n"
        "  - {num_steps: 10, warmup_steps: 4, decay: linear, min_lr_ratio: 0.2, lr: {llm_adapter: 0}}\n"
        "  - {num_steps: 6, decay: cosine, lr: {llm_adapter: 0.5}, replay_fraction: 0.25}\n"
    )
    st = build_stages(load_config(y))
    assert [(s.start, s.end) for s in st] == [(0, 10), (10, 16)]
    assert st[0].trainable == frozenset(PARAM_GROUPS) - {"llm_adapter"}
    for k in range(10):  # warmup (k+1)/w, then linear from 1 to 0.2 over the remaining 6 steps
        want = (k + 1) / 4 if k < 4 else 0.2 + 0.8 * (1 - (k - 4) / 6)
        assert st[0].lrs(k)["mlp"] == pytest.approx(want, abs=1e-15)
        assert st[0].lrs(k)["llm_adapter"] == 0.0
    for k in range(6):
        assert st[1].lrs(10 + k)["llm_adapter"] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * k / 6)))
    assert stage_at(st, 9).index == 0 and stage_at(st, 10).index == 1 and stage_at(st, 99).index == 1
    assert source_weights(st[1], {"target": 1.0, "replay": 1.0}) == {"target": 0.75, "replay": 0.25}
    assert source_weights(st[0], {"target": 3.0, "replay": 1.0}) == {"target": 3.0, "replay": 1.0}
