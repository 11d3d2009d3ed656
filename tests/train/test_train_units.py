"""Unit tests of the trainer's pure parts: param groups, stage schedules, objective, synthetic stream, metrics."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from anima_ft.config import load_config
from anima_ft.config.schema import PARAM_GROUPS
from anima_ft.model import AnimaConfig, build_anima
from anima_ft.observability import MetricsWriter, read_metrics
from anima_ft.train.batches import SyntheticStream
from anima_ft.train.objective import compute_loss, noise_generator
from anima_ft.train.param_groups import apply_trainable, build_param_groups, decays, group_of
from anima_ft.train.stages import build_stages, source_weights, stage_at


def _diffusion_pipe_group(name: str) -> str:
    """diffusion-pipe's substring rule (spec section 8), written independently as the reference."""
    if "llm_adapter" in name:
        return "llm_adapter"
    for key, group in ((".self_attn", "self_attn"), (".cross_attn", "cross_attn"), (".mlp", "mlp"),
                       (".adaln_modulation", "mod")):
        if key in name:
            return group
    if "adaln_modulation" in name:
        return "mod"
    return "base"


@pytest.fixture(scope="module")
def tiny():
    return build_anima(AnimaConfig.tiny(), seed=0)


def test_groups_match_reference_rule(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert {group_of(n) for n in names} == set(PARAM_GROUPS)
    for n in names:
        assert group_of(n) == _diffusion_pipe_group(n), n
    assert group_of("blocks.3.adaln_modulation_self_attn.1.weight") == "mod"
    assert group_of("blocks.3.self_attn.q_norm.weight") == "self_attn"
    assert group_of("final_layer.adaln_modulation.2.weight") == "mod"
    assert group_of("t_embedding_norm.weight") == "base"


def test_no_decay_for_norms_embeddings_biases(tiny):
    params = dict(tiny.named_parameters())
    assert not decays("t_embedding_norm.weight", params["t_embedding_norm.weight"])
    assert not decays("x_embedder.proj.1.weight", params["x_embedder.proj.1.weight"])
    assert not decays("llm_adapter.embed.weight", params["llm_adapter.embed.weight"])
    assert not decays("llm_adapter.blocks.0.mlp.0.bias", params["llm_adapter.blocks.0.mlp.0.bias"])
    assert decays("blocks.0.mlp.layer1.weight", params["blocks.0.mlp.layer1.weight"])
    partitioned = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 shard: flat local data, full shape in ds_shape
    partitioned.ds_shape = torch.Size([8, 4])
    assert decays("blocks.0.mlp.layer1.weight", partitioned)


def test_frozen_group_gets_no_grad_and_no_optimizer_entry(tiny):
    lrs = {g: 1e-4 for g in PARAM_GROUPS} | {"llm_adapter": 0.0, "mod": 2e-5}
    apply_trainable(tiny, lrs)
    groups = build_param_groups(tiny.named_parameters(), lrs, weight_decay=0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    for n, p in tiny.named_parameters():
        frozen = group_of(n) == "llm_adapter"
        assert p.requires_grad is not frozen, n
        assert (id(p) in in_opt) is not frozen, n
    for g in groups:
        assert g["lr"] == lrs[g["group"]]
        assert g["weight_decay"] == (0.1 if g["name"].endswith("/decay") else 0.0)
    apply_trainable(tiny, {g: 1.0 for g in PARAM_GROUPS})


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


class _Linear(torch.nn.Module):
    """pred = a * x_t + b * t (enough to check the objective's algebra against float64)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.7))

    def forward(self, x_t, t, qwen, qmask, ids, tmask):
        return self.a * x_t + self.b * t.view(-1, 1, 1, 1, 1)


def test_compute_loss_matches_float64_reference():
    stream = iter(SyntheticStream(8, 4, 3, 5, micro_batch_size=3, grad_accum_steps=1, dp_rank=0, dp_world_size=1,
                                  seed=0))
    batch = next(stream)
    cfg = load_config(None, ["objective.timestep_sampling=uniform"]).objective
    out = compute_loss(_Linear(), batch, noise_generator(0, 5, 0), cfg)
    g = noise_generator(0, 5, 0)  # replay the same draws in float64
    x0 = batch["latents"].double().unsqueeze(2)
    eps = torch.randn(x0.shape, generator=g).double()
    t = torch.rand(3, generator=g).double()
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    pred = 0.3 * xt - 0.7 * t.view(-1, 1, 1, 1, 1)
    ref = ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.per_sample.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref.mean(), rtol=1e-5, atol=1e-6)


def test_noise_generator_depends_on_every_coordinate():
    draws = {torch.randn(4, generator=noise_generator(*c)).sum().item()
             for c in [(0, 1, 0), (1, 1, 0), (0, 2, 0), (0, 1, 1), (0, 1, 3)]}
    assert len(draws) == 5
    assert torch.equal(torch.randn(4, generator=noise_generator(3, 4, 5)),
                       torch.randn(4, generator=noise_generator(3, 4, 5)))


def test_synthetic_stream_partitions_global_batches_and_resumes():
    def keys(rank, n, start=None):
        s = SyntheticStream(64, 4, 3, 5, micro_batch_size=2, grad_accum_steps=2, dp_rank=rank, dp_world_size=2,
                            seed=0)
        if start is not None:
            s.load_state_dict(start)
        it = iter(s)
        return [k for _ in range(n) for k in next(it)["key"]], s

    r0, s0 = keys(0, 4)
    r1, _ = keys(1, 4)
    assert len(set(r0) | set(r1)) == 16  # two global batches of 8, disjoint across ranks
    resumed, _ = keys(0, 2, start={"consumed": 2})  # a state written before the layout was stored
    assert resumed == r0[4:]
    assert s0.state_dict() == {"consumed": 4, "start": 0,
                               "layout": {"micro_batch_size": 2, "grad_accum_steps": 2, "world_size": 2, "dp_rank": 0}}


def _synthetic_global(world: int, accum: int, micro: int, num_global: int, states: list[dict] | None = None):
    """Keys of ``num_global`` global batches over every rank of a layout, in global order (j = a * W + rank)."""
    ranks = [SyntheticStream(64, 4, 3, 5, micro_batch_size=micro, grad_accum_steps=accum, dp_rank=r,
                             dp_world_size=world, seed=0) for r in range(world)]
    for s in ranks:
        if states is not None:
            s.load_state_dicts(states)
    its, keys = [iter(s) for s in ranks], []
    for _ in range(num_global):
        by_j = {a * world + r: next(it)["key"] for a in range(accum) for r, it in enumerate(its)}
        keys += [k for j in sorted(by_j) for k in by_j[j]]
    return keys, [s.state_dict() for s in ranks]


@pytest.mark.parametrize("new", [(1, 2, 2), (3, 1, 1), (2, 3, 2)])
def test_synthetic_stream_continues_on_another_layout(new):
    """A state of 2 ranks x 1 x micro 2, loaded into any (world, accum, micro) layout, continues the same global
    sample sequence; a state taken inside a global batch is refused."""
    full, _ = _synthetic_global(2, 1, 2, 20)
    before, states = _synthetic_global(2, 1, 2, 3)
    after, _ = _synthetic_global(*new, 3, states)
    assert before + after == full[: len(before) + len(after)]
    inside = SyntheticStream(64, 4, 3, 5, micro_batch_size=2, grad_accum_steps=2, dp_rank=0, dp_world_size=1, seed=0)
    next(iter(inside))
    with pytest.raises(ValueError, match="inside a global batch"):
        _synthetic_global(1, 1, 2, 1, [inside.state_dict()])


def test_metrics_jsonl_last_row_wins(tmp_path):
    w = MetricsWriter(tmp_path, rank=0)
    w.log(1, {"loss": 1.0})
    w.log(2, {"loss": 0.5})
    w.log(2, {"loss": 0.25})  # re-logged after a resume
    w.close()
    assert MetricsWriter(tmp_path / "other", rank=1).enabled is False
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert m == {1: {"step": 1, "loss": 1.0}, 2: {"step": 2, "loss": 0.25}}


def test_wandb_not_imported_when_disabled(tmp_path):
    code = (
        "import sys; from anima_ft.observability import MetricsWriter; "
        f"w = MetricsWriter({str(tmp_path)!r}, 0, 'disabled'); w.log(1, {{'x': 1}}); w.close(); "
        "assert 'wandb' not in sys.modules, 'wandb imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_wandb_offline_resumes_same_run_id(tmp_path):
    code = (
        "from anima_ft.observability import MetricsWriter; import pathlib; "
        f"w = MetricsWriter(pathlib.Path({str(tmp_path)!r}), 0, 'offline', config={{'a': 1}}); "
        "w.log(1, {'loss': 1.0}); print('RUNID', w._wandb.id); w.close()"
    )
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ids = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True,
                             env=env, cwd=str(tmp_path)).stdout
        ids.append(out.split("RUNID", 1)[1].split()[0])
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


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
