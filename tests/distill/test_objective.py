"""DistillObjective against direct float64 recomputations; exact zero at the start; adapter sources; config checks."""

from __future__ import annotations

import copy

import pytest
import torch
from distill_helpers import CaptionData, tiny_model

from anima_ft.config.distill import DistillStage
from anima_ft.config.schema import ObjectiveConfig
from anima_ft.diffusion import sample_timesteps
from anima_ft.distill import DistillConfig, DistillObjective, SourceLoss, Teacher, prepare_student, validate_distill
from anima_ft.distill.context import valid_rows
from anima_ft.train.objective import compute_loss

OBJ = ObjectiveConfig()  # logit-normal t, as training uses
LOSSES = [SourceLoss("target", "flow", 0.7), SourceLoss("replay", "distill", 1.3)]


def _mixed_batch(data: CaptionData) -> dict:
    b = data.batch([0, 1, 2, 3, 1], [0, 1, 2, 3, 6], ["target", "replay", "replay", "target", "replay"],
                   torch.Generator().manual_seed(3))
    b["t5_mask"][4, 2] = False  # one padded T5 position
    b["t5_ids"][4, 2] = 0
    return b


def _pair_f64(student_seed: int = 1):
    teacher = tiny_model(0).double()
    student = tiny_model(student_seed).double()
    return teacher, student


def _recompute(teacher, student, batch, source: str, cfg: DistillConfig, seed: int) -> torch.Tensor:
    """The weighted per-sample loss in float64, written out from the formulas (same generator draw order)."""
    gen = torch.Generator().manual_seed(seed)
    x_0 = batch["latents"].double().unsqueeze(2)
    B = x_0.shape[0]
    eps = torch.randn(x_0.shape, generator=gen).double()
    t = sample_timesteps(B, OBJ.timestep_sampling, OBJ.sigmoid_scale, None, generator=gen).double()
    x_t = (1 - t.view(B, 1, 1, 1, 1)) * x_0 + t.view(B, 1, 1, 1, 1) * eps
    cond = (batch["qwen_states"].double(), batch["qwen_mask"], batch["t5_ids"], batch["t5_mask"])
    ctx_own = student.encode_context(*cond)
    ctx_t = teacher.encode_context(*cond)
    v_t = teacher.denoise(x_t, t, ctx_t)
    base = ctx_t if (source == "frozen" or cfg.perturb_base == "frozen") else ctx_own
    rows = valid_rows(batch["t5_mask"], base.shape[1])
    if source == "dropout":
        u = torch.rand(rows.shape, generator=gen)
        base = base * (~(rows & (u < cfg.context_dropout)))[..., None].double()
    elif source == "noise":
        z = torch.randn(base.shape, generator=gen, dtype=torch.float32).double()
        base = base + cfg.context_noise_std * z * rows[..., None].double()
    distill = torch.tensor([s == "replay" for s in batch["source"]])
    ctx = torch.where(distill[:, None, None], base if source != "own" else ctx_own, ctx_own)
    v_s = student.denoise(x_t, t, ctx)
    flow = (v_s - (eps - x_0)).pow(2).flatten(1).mean(1)
    match = (v_s - v_t).pow(2).flatten(1).mean(1)
    w = torch.tensor([0.7 if s == "target" else 1.3 for s in batch["source"]], dtype=torch.float64)
    return w * torch.where(distill, match, flow)


@pytest.mark.parametrize("source,base", [("own", "own"), ("frozen", "own"), ("dropout", "own"), ("dropout", "frozen"),
                                         ("noise", "own"), ("noise", "frozen")])
def test_loss_equals_float64_recomputation(source, base):
    teacher, student = _pair_f64()
    batch = _mixed_batch(CaptionData())
    cfg = DistillConfig(losses=LOSSES, adapter_source=source, perturb_base=base, context_dropout=0.5,
                        context_noise_std=0.3)
    out = DistillObjective(Teacher(copy.deepcopy(teacher)), cfg, OBJ)(student, batch, torch.Generator().manual_seed(11))
    want = _recompute(teacher, student, batch, source, cfg, 11)
    torch.testing.assert_close(out.per_sample.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.loss.double(), want.mean(), rtol=1e-6, atol=1e-9)
    assert out.kind.tolist() == [0, 1, 1, 0, 1]


def test_perturbations_change_the_context():
    """The dropout / noise sources give a loss different from the unperturbed one (the draws take effect)."""
    teacher, student = _pair_f64()
    batch = _mixed_batch(CaptionData())
    losses = {}
    for source in ("own", "dropout", "noise"):
        cfg = DistillConfig(losses=LOSSES, adapter_source=source, context_dropout=0.5, context_noise_std=0.3)
        obj = DistillObjective(Teacher(copy.deepcopy(teacher)), cfg, OBJ)
        losses[source] = obj(student, batch, torch.Generator().manual_seed(11)).per_sample
    for source in ("dropout", "noise"):
        assert torch.equal(losses[source][[0, 3]], losses["own"][[0, 3]])  # flow rows untouched
        assert not torch.allclose(losses[source][[1, 2, 4]], losses["own"][[1, 2, 4]], rtol=1e-6, atol=0)


def test_reinit_source_recomputation():
    teacher, _ = _pair_f64()
    student = copy.deepcopy(teacher)
    cfg = DistillConfig(losses=LOSSES, adapter_source="reinit", reinit_seed=5)
    prepare_student(student, cfg)
    assert not torch.equal(student.llm_adapter.out_proj.weight, teacher.llm_adapter.out_proj.weight)
    batch = _mixed_batch(CaptionData())
    out = DistillObjective(Teacher(copy.deepcopy(teacher)), cfg, OBJ)(student, batch, torch.Generator().manual_seed(2))
    want = _recompute(teacher, student, batch, "own", cfg, 2)
    torch.testing.assert_close(out.per_sample.double(), want, rtol=1e-6, atol=1e-9)
    assert out.per_sample[1] > 0


@pytest.mark.parametrize("source", ["own", "frozen"])
def test_student_equal_to_teacher_gives_exactly_zero(source):
    model = tiny_model(0)
    teacher = Teacher.from_model(model)
    data = CaptionData()
    cfg = DistillConfig(losses=[SourceLoss("replay", "distill", 1.0), SourceLoss("target", "flow", 1.0)],
                        adapter_source=source)
    obj = DistillObjective(teacher, cfg, OBJ)
    all_distill = data.batch([0, 1, 2], [0, 1, 7], "replay")
    out = obj(model, all_distill, torch.Generator().manual_seed(0))
    assert out.loss.item() == 0.0 and torch.count_nonzero(out.per_sample) == 0
    mixed = _mixed_batch(data)  # the teacher runs on the distill rows only: batch-size rounding, not exact
    out = obj(model, mixed.copy(), torch.Generator().manual_seed(0))
    assert out.raw[out.kind == 1].max().item() < 1e-10
    assert out.raw[out.kind == 0].min().item() > 1e-3


def test_flow_only_matches_compute_loss_exactly():
    model = tiny_model(0)
    batch = CaptionData().batch([0, 1, 2, 3], [0, 1, 2, 3], "target", torch.Generator().manual_seed(1))
    obj = DistillObjective(None, DistillConfig(losses=[SourceLoss("target", "flow", 1.0)]), OBJ)
    out = obj(model, batch, torch.Generator().manual_seed(9))
    ref = compute_loss(model, batch, torch.Generator().manual_seed(9), OBJ)
    assert torch.equal(out.per_sample, ref.per_sample) and torch.equal(out.loss, ref.loss)


def test_gradients_follow_the_context_source():
    """``own``: the student's adapter gets gradients from distill rows; ``frozen``: it gets none."""
    teacher, student = _pair_f64()
    batch = CaptionData().batch([0, 1], [0, 1], "replay")
    for source, expect in (("own", True), ("frozen", False)):
        student.zero_grad(set_to_none=True)
        cfg = DistillConfig(losses=[SourceLoss("replay", "distill", 1.0)], adapter_source=source)
        DistillObjective(Teacher(copy.deepcopy(teacher)), cfg, OBJ)(student, batch, torch.Generator()).loss.backward()
        g = student.llm_adapter.out_proj.weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect, source
        assert student.blocks[0].cross_attn.k_proj.weight.grad.abs().sum() > 0


def test_small_adapter_architecture():
    from anima_ft.model import infer_config

    model = tiny_model(0)
    prepare_student(model, DistillConfig(adapter_source="small", small_num_layers=1, small_mlp_hidden=64))
    assert len(model.llm_adapter.blocks) == 1 and model.llm_adapter.blocks[0].mlp[0].out_features == 64
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    acfg = infer_config(shapes).adapter
    assert (acfg.num_layers, acfg.mlp_hidden) == (1, 64)
    v = model(torch.zeros(1, 16, 1, 8, 8), torch.tensor([0.5]), torch.zeros(1, 2, 32),
              torch.ones(1, 2, dtype=torch.bool), torch.tensor([[5, 1]]), torch.ones(1, 2, dtype=torch.bool))
    assert v.shape == (1, 16, 1, 8, 8)


def test_stage_overrides_switch_terms():
    cfg = DistillConfig(losses=LOSSES, adapter_source="frozen",
                        stages=[DistillStage(), DistillStage(losses=[SourceLoss("target", "flow", 1.0)],
                                                             adapter_source="own")])
    obj = DistillObjective(Teacher(tiny_model(0)), cfg, OBJ, num_stages=2)
    assert obj.adapter_source == "frozen" and obj.terms["replay"].kind == "distill"
    obj.set_stage(1)
    assert obj.adapter_source == "own" and set(obj.terms) == {"target"}
    with pytest.raises(ValueError, match=r"source\(s\) \['replay'\]"):
        obj(tiny_model(0), CaptionData().batch([0], [0], "replay"), torch.Generator())


@pytest.mark.parametrize("kwargs,match", [
    ({"adapter_source": "weak"}, "adapter_source"),
    ({"losses": [SourceLoss("a", "flow"), SourceLoss("a", "distill")]}, "listed twice"),
    ({"losses": [SourceLoss("a", "kl")]}, "kind"),
    ({"context_dropout": 1.0}, "context_dropout"),
    ({"teacher": "precomputed"}, "precomputed_dir"),
    ({"teacher": "precomputed", "precomputed_dir": "x", "adapter_source": "frozen"}, "teacher's context"),
    ({"adapter_source": "reinit", "stages": [DistillStage(adapter_source="own")]}, "whole run"),
    ({"stages": [DistillStage(), DistillStage()]}, "one entry per stage"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_distill(DistillConfig(**kwargs), num_stages=1)
