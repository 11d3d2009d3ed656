"""Adapter swap round trip, attribution consistency, and the probe / swap command lines end to end."""

from __future__ import annotations

import csv

import pytest
import torch
from eval_helpers import make_samples, randomize_
from safetensors.torch import load_file
from test_eval_sets import write_shard

from anima_ft.eval import probe_cli, probe_inputs, swap
from anima_ft.eval.probe import evaluate_sets

SIGMAS = (0.3, 0.8)


def _save_tiny(path, seed):
    from anima_ft.model import AnimaConfig, build_anima, save_anima

    save_anima(randomize_(build_anima(AnimaConfig.tiny(), seed=0), seed=seed), path, dtype=torch.float32)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"A": _save_tiny(d / "run_step0.safetensors", 1), "B": _save_tiny(d / "run_step100.safetensors", 2),
            "dir": d}


def _split(path):
    t = load_file(path)
    return ({k: v for k, v in t.items() if ".llm_adapter." not in k},
            {k: v for k, v in t.items() if ".llm_adapter." in k})


def test_swap_round_trip(ckpts, tmp_path):
    a, b = ckpts["A"], ckpts["B"]
    ab = swap.compose(a, b, tmp_path / "ab.safetensors")  # A's DiT, B's adapter
    dit_ab, ad_ab = _split(str(ab))
    dit_a, ad_a = _split(a)
    dit_b, ad_b = _split(b)
    assert dit_ab.keys() == dit_a.keys() and all(torch.equal(dit_ab[k], dit_a[k]) for k in dit_a)
    assert ad_ab.keys() == ad_b.keys() and all(torch.equal(ad_ab[k], ad_b[k]) for k in ad_b)
    back = swap.compose(ab, a, tmp_path / "back.safetensors")  # put A's adapter back: A exactly
    got, ref = load_file(str(back)), load_file(a)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_swap_reinit_adapter(ckpts, tmp_path):
    from anima_ft.model import AnimaConfig, build_anima

    assert swap.main(["--dit", ckpts["A"], "--adapter", "init", "--seed-init", "5", str(tmp_path / "r.st")]) == 0
    dit_r, ad_r = _split(str(tmp_path / "r.st"))
    fresh = build_anima(AnimaConfig.tiny(), seed=5).llm_adapter.state_dict()
    assert set(ad_r) == {"net.llm_adapter." + k for k in fresh}
    assert all(torch.equal(ad_r["net.llm_adapter." + k], v) for k, v in fresh.items())
    dit_a, _ = _split(ckpts["A"])
    assert all(torch.equal(dit_r[k], dit_a[k]) for k in dit_a)


def test_attribution_is_consistent(ckpts, tmp_path):
    a, b = ckpts["A"], ckpts["B"]
    sets = {"replay": make_samples("r", 2)}
    losses, per_set = swap.run_attribution(a, b, sets, SIGMAS, num_noises=2)
    parts = per_set["replay"]
    for j in range(len(SIGMAS)):
        assert parts["dit"][j] + parts["adapter"][j] == pytest.approx(parts["total"][j], rel=1e-12, abs=1e-15)
        manual = losses[("B", "B")]["replay"][j] - losses[("A", "A")]["replay"][j]
        assert parts["total"][j] == pytest.approx(manual, rel=1e-12)
    # L(A, A) is just checkpoint A
    from anima_ft.model import load_anima

    direct = evaluate_sets(load_anima(a), sets, SIGMAS, 2)["replay"].mean(0).tolist()
    assert losses[("A", "A")]["replay"] == direct
    # B' = A's DiT with B's adapter: the whole change must follow the adapter, none the DiT
    b_prime = swap.compose(a, b, tmp_path / "bprime.safetensors")
    _, per_set2 = swap.run_attribution(a, b_prime, sets, SIGMAS, num_noises=2)
    assert per_set2["replay"]["dit"] == [0.0, 0.0] and per_set2["replay"]["interaction"] == [0.0, 0.0]
    assert per_set2["replay"]["adapter"] == per_set2["replay"]["total"]
    table = swap.attribution_table(per_set2, SIGMAS)
    assert "| replay | 0.3 |" in table and "100.0%" in table


def test_probe_cli_end_to_end(ckpts, tmp_path, capsys):
    shard_dir = tmp_path / "replay"
    shard_dir.mkdir()
    samples = make_samples("r", 3, seed=9)
    write_shard(shard_dir / "r-0000.tar", samples)
    out = tmp_path / "out"
    rc = probe_cli.main([ckpts["A"], ckpts["B"], "--eval-set", f"replay={shard_dir}", "--sigmas", "0.3,0.8",
                         "--num-noises", "2", "--dtype", "fp32", "--device", "cpu", "--out-dir", str(out)])
    assert rc == 0
    err = capsys.readouterr().err  # one progress bar per checkpoint, ending at the 3 images
    assert "probe run_step0.safetensors" in err and "probe run_step100.safetensors" in err and "3/3" in err
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert [(r["step"], r["sigma"]) for r in rows] == [("0", "0.3"), ("0", "0.8"), ("100", "0.3"), ("100", "0.8")]
    from anima_ft.eval.eval_sets import load_shard_eval_set
    from anima_ft.model import load_anima

    ref = evaluate_sets(load_anima(ckpts["B"]), {"replay": load_shard_eval_set(shard_dir)}, SIGMAS, 2)["replay"]
    assert float(rows[2]["loss"]) == ref.mean(0)[0].item() and float(rows[3]["loss"]) == ref.mean(0)[1].item()
    assert float(rows[0]["rel_to_first"]) == 1.0
    assert float(rows[3]["rel_to_first"]) == pytest.approx(float(rows[3]["loss"]) / float(rows[1]["loss"]))
    assert len(list(csv.DictReader(open(out / "probe_samples.csv")))) == 2 * 3 * 2
    for png in ("probe_loss.png", "probe_loss_rel.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_cli_image_folder_with_tiny_encoders(ckpts, tmp_path, tokenizer_dir):
    """An image folder is encoded on the fly (prepare's buckets and encoders) and equals the in-memory probe."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "im0.txt").write_text("1girl, solo")
    args = ["--eval-set", f"unrelated={folder}", "--sigmas", "0.5", "--num-noises", "2", "--dtype", "fp32",
            "--device", "cpu", "--tiny-encoders", "0", "--bucket-area", "4096",
            "--qwen-tokenizer", str(tokenizer_dir / "qwen3_06b"), "--t5-tokenizer", str(tokenizer_dir / "t5_old")]
    out = tmp_path / "out"
    assert probe_cli.main([ckpts["A"], *args, "--out-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "probe_samples.csv")))
    assert [r["key"] for r in rows] == ["im0", "im1"]
    ns = probe_inputs.argparse.Namespace(eval_set=[f"unrelated={folder}"], limit=0, **{
        "vae": None, "qwen": None, "qwen_config": None, "qwen_tokenizer": str(tokenizer_dir / "qwen3_06b"),
        "t5_tokenizer": str(tokenizer_dir / "t5_old"), "tiny_encoders": 0, "vae_dtype": "fp32", "qwen_dtype": "bf16",
        "bucket_area": 4096, "device": "cpu"})
    sets = probe_inputs.eval_sets_from_args(ns)
    s0 = sets["unrelated"][0]
    assert s0.latents.shape == (16, 8, 8) and s0.caption == "1girl, solo" and s0.t5_ids[-1] == 1
    assert sets["unrelated"][1].qwen_states.shape[0] == 0  # no caption file: empty caption
    from anima_ft.model import load_anima

    ref = evaluate_sets(load_anima(ckpts["A"]), sets, (0.5,), 2)["unrelated"]
    assert [float(r["loss"]) for r in rows] == ref[:, 0].tolist()
