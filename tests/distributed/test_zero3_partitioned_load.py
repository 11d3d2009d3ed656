"""ZeRO-3 loads ``model.init_path`` straight into partitions (train/zero3_load.py): the same weights and the same
training as the whole-model path, and no rank ever holds the whole model (at full size the whole-model load made
ZeRO-3 peak above ZeRO-2: docs/full_size_cpu.md#defects)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anima_ft.model import AnimaConfig
from anima_ft.model.groups import lr_group, strip_prefix
from anima_ft.model.streamed_file import write_random_anima
from anima_ft.train.export import export_checkpoint

pytestmark = pytest.mark.multiproc
REPO = Path(__file__).resolve().parents[2]
FROZEN = ("base", "self_attn", "cross_attn", "mlp", "llm_adapter")


def _run(launcher, run: Path, model: Path, zero: int) -> list[float]:
    lrs = [f"optim.lr.{g}=0" for g in FROZEN]  # only mod trains: the frozen tensors must come out as they went in
    rc, out, _ = launcher(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"run.dir={run}",
                           f"model.init_path={model}", f"dist.zero_stage={zero}", "num_steps=4",
                           "checkpoint.every_steps=0", *lrs])
    assert rc == 0, out[-4000:]
    assert ("into ZeRO-3 partitions" in out) == (zero == 3), out[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def test_zero3_partitioned_load_trains_like_the_whole_model_load(launcher, tmp_path):
    model = tmp_path / "model.safetensors"
    write_random_anima(model, AnimaConfig.tiny(), seed=4)
    z3 = _run(launcher, tmp_path / "z3", model, 3)
    z2 = _run(launcher, tmp_path / "z2", model, 2)
    assert len(z3) == len(z2) == 4
    for a, b in zip(z3, z2):
        assert abs(a - b) <= 1e-5 * abs(b), (z3, z2)  # fp32; only the reduction order differs
    out = export_checkpoint(next((tmp_path / "z3" / "checkpoints").glob("step_*")), tmp_path / "z3.safetensors")
    with safe_open(str(model), "pt") as a, safe_open(str(out), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            same = torch.equal(a.get_tensor(k), b.get_tensor(k))
            assert same == (lr_group(strip_prefix(k)) in FROZEN), k  # frozen: bitwise the file; mod: trained
