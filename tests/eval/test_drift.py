"""Weight drift: per-tensor and per-group values against a hand computation on known tensors."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import save_file

from anima_ft.eval import drift


def _write(path, tensors, prefix="net."):
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_drift_equals_hand_computation(tmp_path):
    # known tensors: a = [3, 4] -> ||a|| = 5; b = [3, 0] -> ||b-a|| = 4, <a,b> = 9, ||b|| = 3
    a = {"blocks.0.mlp.layer1.weight": torch.tensor([[3.0, 4.0]]),
         "blocks.0.mlp.layer2.weight": torch.tensor([[1.0], [0.0]]),
         "llm_adapter.blocks.0.norm_mlp.weight": torch.ones(4),
         "pos_embedder.seq": torch.arange(3.0)}
    b = {"blocks.0.mlp.layer1.weight": torch.tensor([[3.0, 0.0]]),
         "blocks.0.mlp.layer2.weight": torch.tensor([[2.0], [0.0]]),
         "llm_adapter.blocks.0.norm_mlp.weight": torch.ones(4),
         "final_layer.linear.weight": torch.ones(2, 2)}
    pa = _write(tmp_path / "a.safetensors", a, prefix="net.")
    pb = _write(tmp_path / "b.safetensors", b, prefix="model.diffusion_model.")
    c = drift.compare_files(pa, pb)
    t1 = c.tensors["blocks.0.mlp.layer1.weight"]
    assert t1.rel == pytest.approx(4 / 5, abs=1e-15) and t1.cos == pytest.approx(9 / 15, abs=1e-15)
    t2 = c.tensors["blocks.0.mlp.layer2.weight"]
    assert t2.rel == pytest.approx(1.0) and t2.cos == pytest.approx(1.0)
    # group = concatenated vector [3,4,1,0] vs [3,0,2,0]: ||diff||^2 = 16+1, ||a||^2 = 26, <a,b> = 11, ||b||^2 = 13
    g = c.groups["blocks.0.mlp"]
    assert g.rel == pytest.approx(math.sqrt(17 / 26), abs=1e-15)
    assert g.cos == pytest.approx(11 / math.sqrt(26 * 13), abs=1e-15)
    assert c.groups["llm_adapter.blocks.0"].rel == 0.0 and c.groups["llm_adapter.blocks.0"].cos == pytest.approx(1.0)
    assert c.only_in_b == ["final_layer.linear.weight"] and c.only_in_a == []  # pos_embedder is ignored


def test_drift_random_tensors_float64(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a = {f"blocks.{i}.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen) for i in range(3)}
    b = {k: (v + 0.1 * torch.randn(8, 8, generator=gen)).to(torch.bfloat16) for k, v in a.items()}
    c = drift.compare_files(_write(tmp_path / "a.st", a), _write(tmp_path / "b.st", b, prefix=""))
    for k in a:
        a64, b64 = a[k].double(), b[k].double()
        assert c.tensors[k].rel == pytest.approx(float((b64 - a64).norm() / a64.norm()), rel=1e-12)
        ref_cos = float((a64 * b64).sum() / (a64.norm() * b64.norm()))
        assert c.tensors[k].cos == pytest.approx(ref_cos, rel=1e-12)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    pa = _write(tmp_path / "a.safetensors", {"blocks.0.mlp.layer1.weight": torch.zeros(4, 2)})
    pb = _write(tmp_path / "b.safetensors", {"blocks.0.mlp.layer1.weight": torch.zeros(8, 2)})
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.layer1\.weight.*\(4, 2\).*\(8, 2\)"):
        drift.compare_files(pa, pb)


def test_cli_writes_table_csv_and_heatmap(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    base = {"blocks.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=gen),
            "blocks.0.adaln_modulation_mlp.1.weight": torch.randn(4, 4, generator=gen),
            "llm_adapter.blocks.0.mlp.0.weight": torch.randn(4, 4, generator=gen)}
    paths = [_write(tmp_path / "p0.safetensors", base)]
    for i in (1, 2):
        paths.append(_write(tmp_path / f"p{i}.safetensors", {k: v * (1 + 0.1 * i) for k, v in base.items()}))
    out = tmp_path / "out"
    assert drift.main([*paths, "--labels", "cosmos,p1,p2", "--out-dir", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "| blocks.0.self_attn |" in text and "rel p2 vs cosmos" in text
    assert "drift p2.safetensors" in captured.err and "3/3" in captured.err  # a progress bar over the tensors
    rows = list(csv.DictReader(open(out / "drift_groups.csv")))
    p2 = [r for r in rows if r["comparison"] == "p2 vs cosmos" and r["group"] == "blocks.0.mod"][0]
    assert float(p2["rel_change"]) == pytest.approx(0.2, rel=1e-6)  # b = 1.2 a -> ||b-a||/||a|| = 0.2
    assert float(p2["cosine"]) == pytest.approx(1.0, abs=1e-6)
    assert (out / "drift_heatmap.png").stat().st_size > 1000
    # --chain compares p2 with p1: 1.2/1.1 - 1
    assert drift.main([*paths, "--chain", "--labels", "cosmos,p1,p2", "--out-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "drift_groups.csv")))
    r = [r for r in rows if r["comparison"] == "p2 vs p1" and r["group"] == "blocks.0.self_attn"][0]
    assert float(r["rel_change"]) == pytest.approx(1.2 / 1.1 - 1, rel=1e-5)
