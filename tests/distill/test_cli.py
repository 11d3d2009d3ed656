"""``anima-ft distill precompute|attribute`` on tiny prepare shards, and the trainer-side ``build_distill``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from distill_helpers import CaptionData, tiny_model

from anima_ft.config.schema import Config
from anima_ft.data.shard_format import EncodedSample, ShardWriter, make_fingerprint
from anima_ft.distill import DistillConfig, SourceLoss, Teacher, VelocityStore
from anima_ft.distill.build import build_distill
from anima_ft.distill.cli import main
from anima_ft.model import load_anima, save_anima

FINGERPRINT = make_fingerprint({"vae": "test", "seed": 0}, {"text": "test", "seed": 0})


def _write_shards(folder, data: CaptionData, classes, variants, prefix: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    with ShardWriter(folder / f"{prefix}-0000.tar", FINGERPRINT) as writer:
        for c in classes:
            for j in variants:
                b = data.batch([c], [j], prefix, torch.Generator().manual_seed(c * 31 + j))
                key = f"{prefix}_c{c}_v{j}"
                writer.add(EncodedSample(key, b["latents"][0], b["qwen_states"][0], b["t5_ids"][0].int(),
                                         {"caption": b["caption"][0], "source": prefix, "bucket": [64, 64]}))
                keys.append(key)
        writer.commit()
    return keys


def test_precompute_cli_two_ranks_cover_all_keys(tmp_path):
    data = CaptionData()
    keys = _write_shards(tmp_path / "replay", data, [0, 1], [0, 1, 2], "replay")
    model = tiny_model(0)
    save_anima(model, tmp_path / "teacher.safetensors")
    out = tmp_path / "store"
    for rank in range(2):
        assert main(["precompute", "--teacher", str(tmp_path / "teacher.safetensors"), "--shards",
                     str(tmp_path / "replay"), "--out", str(out), "--sigmas", "0.3,0.7", "--rank", str(rank),
                     "--world-size", "2", "--device", "cpu", "--dtype", "fp32", "--store-dtype", "fp32"]) == 0
    store = VelocityStore(out)
    assert sorted(store.keys) == sorted(keys) and store.num_draws == 2
    assert {json.loads(p.read_text())["keys"].__len__() for p in out.glob("index-r*.json")} == {3}
    # the stored velocity is the checkpoint teacher's at the stored (t, noise)
    teacher = load_anima(tmp_path / "teacher.safetensors", dtype=torch.float32)  # bf16 weights, as saved
    from anima_ft.eval.eval_sets import collate_condition, load_shard_eval_set

    sample = load_shard_eval_set(tmp_path / "replay")[0]
    t, eps, v = store.get(sample.key, 1)
    t32 = torch.tensor(t, dtype=torch.float32)
    x_t = ((1 - t32) * sample.latents + t32 * eps)[None, :, None]
    cond = collate_condition(sample, "cpu", torch.float32)
    ref = teacher(x_t, t32[None], cond["qwen_states"], cond["qwen_mask"], cond["t5_ids"], cond["t5_mask"])
    torch.testing.assert_close(v, ref[0, :, 0], rtol=1e-5, atol=1e-6)


def test_build_distill_teacher_from_checkpoint_and_reinit_student(tmp_path):
    base = tiny_model(0)
    save_anima(base, tmp_path / "init.safetensors")
    cfg = Config()
    cfg.model.init_path, cfg.dist.precision = str(tmp_path / "init.safetensors"), "fp32"
    student = load_anima(tmp_path / "init.safetensors", dtype=torch.float32)
    assert build_distill(cfg, DistillConfig(enabled=False), student, {}) is None
    dcfg = DistillConfig(enabled=True, adapter_source="reinit", reinit_seed=3,
                         losses=[SourceLoss("replay", "distill", 1.0)])
    before = copy.deepcopy(student.state_dict())
    objective = build_distill(cfg, dcfg, student, {})
    teacher = objective.teacher
    assert isinstance(teacher, Teacher) and not teacher.module.training
    for name, value in teacher.module.state_dict().items():  # the teacher is the init checkpoint, adapter included
        assert torch.equal(value, before[name]), name
    assert not torch.equal(student.llm_adapter.out_proj.weight, before["llm_adapter.out_proj.weight"])
    assert torch.equal(student.blocks[0].mlp.layer1.weight, before["blocks.0.mlp.layer1.weight"])
    assert all(not p.requires_grad for p in teacher.module.parameters())


def test_build_distill_random_init_copies_the_student_before_reinit():
    cfg = Config()
    student = tiny_model(0)
    ref = copy.deepcopy(student)
    objective = build_distill(cfg, DistillConfig(enabled=True, adapter_source="small"), student, {})
    assert torch.equal(objective.teacher.module.llm_adapter.out_proj.weight, ref.llm_adapter.out_proj.weight)
    assert len(student.llm_adapter.blocks) == 1


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    _write_shards(root / "data" / "shards" / "replay_probe", CaptionData(), [2, 3], [6, 7], "replay")
    save_anima(tiny_model(0), root / "base.safetensors")
    return root


def test_attribute_cli_golden_pairings(lab_dir, tmp_path):
    """A student whose DiT is the teacher's and whose adapter is re-initialized: the re-init pairings of both DiTs
    are the same model (shift exactly 0) and the student DiT with the teacher's adapter is the teacher (gap 0)."""
    from anima_ft.distill import prepare_student

    student = load_anima(lab_dir / "base.safetensors", dtype=torch.float32)
    prepare_student(student, DistillConfig(enabled=True, adapter_source="reinit", reinit_seed=1234))
    save_anima(student, tmp_path / "student.safetensors")
    assert main(["attribute", "--teacher", str(lab_dir / "base.safetensors"), "--student",
                 str(tmp_path / "student.safetensors"), "--eval-set",
                 f"replay={lab_dir / 'data' / 'shards' / 'replay_probe'}", "--sigmas", "0.5", "--num-noises", "2",
                 "--dtype", "fp32", "--device", "cpu", "--reinit-seed", "1234", "--out-dir", str(tmp_path / "a")]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |")
            for line in (tmp_path / "a" / "redistribution.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["shift = 1 - after/before"] == "+0.000"
    assert rows["student DiT + teacher adapter"] == "0.000e+00 (0.0%)"
    assert rows["teacher DiT + re-init adapter (before)"] == rows["student DiT + re-init adapter (after)"]
    assert float(rows["teacher DiT + re-init adapter (before)"].split()[0]) > 0


def test_distill_lab_points_to_the_lab(capsys):
    """The redistribution variant moved into ``anima-ft lab`` (it trains through launch/train.py there)."""
    assert main(["lab", "--lab-dir", "runs/lab"]) == 2
    assert "anima-ft lab --out LAB_DIR --reuse-runs" in capsys.readouterr().err
