"""Precomputed teacher velocities: the store holds v_T at the stated (t, noise); the objective reads them back."""

from __future__ import annotations

import copy

import pytest
import torch
from distill_helpers import CaptionData, tiny_model

from anima_ft.config.schema import ObjectiveConfig
from anima_ft.diffusion import sample_timesteps
from anima_ft.distill import DistillConfig, DistillObjective, SourceLoss, Teacher, VelocityStore
from anima_ft.distill.precompute import draw_noise, write_teacher_velocities

SIGMAS = [0.25, 0.5, 0.75]
OBJ = ObjectiveConfig()


def _batches(data: CaptionData):
    yield data.batch([0, 1], [0, 1], "replay")
    yield data.batch([2, 3, 1], [2, 3, 4], "replay")


def test_store_holds_teacher_velocity_at_fixed_draws(tmp_path):
    data = CaptionData()
    model = tiny_model(0).double()
    write_teacher_velocities(Teacher(copy.deepcopy(model)), _batches(data), tmp_path, SIGMAS, seed=3,
                             samples_per_shard=2, dtype=torch.float64)
    store = VelocityStore(tmp_path)
    assert store.num_draws == 3 and len(store.keys) == 5 and len(set(store.keys.values())) == 3
    batch = data.batch([2, 3, 1], [2, 3, 4], "replay")
    for b, key in enumerate(batch["key"]):
        for k, sigma in enumerate(SIGMAS):
            t, eps, v = store.get(key, k)
            assert t == sigma
            assert torch.equal(eps, draw_noise(key, k, (16, 8, 8), 3))
            s32 = torch.tensor(sigma, dtype=torch.float32)  # the writer forms x_t in float32, as training does
            x_t = ((1 - s32) * batch["latents"][b] + s32 * eps).double()[None, :, None]
            cond = [batch[n][b:b + 1] for n in ("qwen_states", "qwen_mask", "t5_ids", "t5_mask")]
            ref = model(x_t, torch.tensor([sigma], dtype=torch.float64), cond[0].double(), *cond[1:])[0, :, 0]
            torch.testing.assert_close(store.velocity(key)[k], ref, rtol=1e-9, atol=1e-12)  # stored float64
            torch.testing.assert_close(v, ref.float())  # get() hands out float32
    with pytest.raises(ValueError, match="no precomputed teacher velocity"):
        store.velocity("unknown-key")


def test_bf16_store_size_is_k_times_latent_bytes(tmp_path):
    data = CaptionData()
    write_teacher_velocities(Teacher(tiny_model(0)), _batches(data), tmp_path, SIGMAS, samples_per_shard=100)
    (shard,) = tmp_path.glob("velocities-*.safetensors")
    payload = 5 * len(SIGMAS) * 16 * 8 * 8 * 2  # samples x K x latent elements x 2 bytes
    assert payload <= shard.stat().st_size < payload + 4096  # plus the safetensors header


def test_objective_reads_the_store(tmp_path):
    """Per-sample loss = mean (v_S(x_t(t_k, eps_k)) - v_k)^2 with k drawn after eps and t; flow rows unchanged."""
    data = CaptionData()
    teacher = tiny_model(0).double()
    write_teacher_velocities(Teacher(copy.deepcopy(teacher)), _batches(data), tmp_path, SIGMAS, seed=1,
                             dtype=torch.float64)
    store = VelocityStore(tmp_path)
    student = tiny_model(1).double()
    cfg = DistillConfig(losses=[SourceLoss("replay", "distill", 2.0), SourceLoss("target", "flow", 1.0)],
                        teacher="precomputed", precomputed_dir=str(tmp_path))
    batch = data.batch([0, 1, 2, 3], [0, 1, 2, 3], ["replay", "target", "replay", "replay"],
                       torch.Generator().manual_seed(0))
    batch["key"] = ["c0v0n0", "flow-row", "c2v2n0", "c3v3n1"]  # keys as written by _batches
    out = DistillObjective(store, cfg, OBJ)(student, batch, torch.Generator().manual_seed(4))

    gen = torch.Generator().manual_seed(4)
    x_0 = batch["latents"].double().unsqueeze(2)
    eps = torch.randn(x_0.shape, generator=gen).double()
    t = sample_timesteps(4, OBJ.timestep_sampling, OBJ.sigmoid_scale, None, generator=gen).double()
    pick = torch.randint(3, (4,), generator=gen)
    cond = (batch["qwen_states"].double(), batch["qwen_mask"], batch["t5_ids"], batch["t5_mask"])
    for b in range(4):
        if b == 1:
            x_t = (1 - t[b]) * x_0[b] + t[b] * eps[b]
            v = student(x_t[None], t[b:b + 1], *(c[b:b + 1] for c in cond))[0]
            want = (v - (eps[b] - x_0[b])).pow(2).mean()
        else:
            t_k, eps_k, v_k = store.get(batch["key"][b], int(pick[b]))
            x_t = (1 - t_k) * x_0[b] + t_k * eps_k.double()[:, None]
            v = student(x_t[None], torch.tensor([t_k], dtype=torch.float64), *(c[b:b + 1] for c in cond))[0]
            want = 2.0 * (v - v_k.double()[:, None]).pow(2).mean()
        assert out.per_sample[b].item() == pytest.approx(want.item(), rel=1e-6)


def test_objective_with_store_of_the_student_itself_is_zero(tmp_path):
    data = CaptionData()
    model = tiny_model(0)
    write_teacher_velocities(Teacher(copy.deepcopy(model)), _batches(data), tmp_path, SIGMAS, dtype=torch.float32)
    cfg = DistillConfig(losses=[SourceLoss("replay", "distill", 1.0)], teacher="precomputed",
                        precomputed_dir=str(tmp_path))
    out = DistillObjective(VelocityStore(tmp_path), cfg, OBJ)(model, data.batch([2, 3, 1], [2, 3, 4], "replay"),
                                                              torch.Generator().manual_seed(0))
    assert out.loss.item() < 1e-10  # batch K (precompute) vs batch 3 (training) rounding only
