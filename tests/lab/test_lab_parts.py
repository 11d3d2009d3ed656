"""The lab's building blocks: PCA codec vs a float64 SVD/sklearn reference, digit splits and captions, the tiny text
stack's token conventions, and the report's numbers and sentences vs the formulas in its docstring."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from anima_ft.lab.codec import PCAPatchCodec, _from_patches, _to_patches
from anima_ft.lab.digits import DIGIT_WORDS, caption_for, caption_vocabulary, load_digit_splits, pixels_from_images
from anima_ft.lab.report import VariantResult, interpretation, paired_diff, rise, write_report


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 24, generator=g, dtype=torch.float64) * 2 - 1


def test_patches_round_trip_and_layout():
    x = _images(3)
    p = _to_patches(x, 8)  # [3 * 2 * 3, 192]
    assert p.shape == (18, 192)
    # patch (b=1, row 1, col 2), channel 2, pixel (3, 5)
    assert p[1 * 6 + 1 * 3 + 2, 2 * 64 + 3 * 8 + 5] == x[1, 2, 8 + 3, 16 + 5]
    assert torch.equal(_from_patches(p, 3, 2, 3, 8), x)


def test_codec_matches_sklearn_pca_and_normalizes():
    from sklearn.decomposition import PCA

    x = _images(40)
    codec = PCAPatchCodec.fit(x, channels=16)
    patches = _to_patches(x, 8).numpy()
    ref = PCA(n_components=16, svd_solver="full").fit(patches)
    # same subspace direction by direction (up to sign), same variances
    cos = np.abs(np.sum(codec.basis_C_D.numpy() * ref.components_, axis=1))
    assert np.allclose(cos, 1.0, atol=1e-6)
    assert np.allclose(codec.scale_C.numpy() ** 2, ref.explained_variance_, rtol=1e-6)
    z = codec.encode(x.float())
    assert z.shape == (40, 16, 2, 3)
    # normalized latents: zero mean and unit variance per channel on the fit data (n-1 convention)
    flat = z.double().permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.allclose(flat.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(flat.var(0), torch.ones(16, dtype=torch.float64), atol=1e-4)
    # decode = the rank-16 PCA reconstruction
    want = ref.inverse_transform(ref.transform(patches))
    got = _to_patches(codec.decode(z).double(), 8).numpy()
    assert np.abs(got - want).max() < 1e-5


def test_codec_save_load_and_fingerprint(tmp_path):
    a = PCAPatchCodec.fit(_images(20, seed=1))
    a.save(tmp_path / "c.safetensors")
    b = PCAPatchCodec.load(tmp_path / "c.safetensors")
    assert a.fingerprint() == b.fingerprint()
    assert PCAPatchCodec.fit(_images(20, seed=2)).fingerprint() != a.fingerprint()
    with pytest.raises(ValueError, match="multiples of 8"):
        a.encode(torch.zeros(1, 3, 12, 16))


def test_digit_splits_are_disjoint_deterministic_and_captioned():
    a = load_digit_splits((0, 1, 2), probe_per_class=3, size=16, seed=0, max_train_per_class=5)
    b = load_digit_splits((0, 1, 2), probe_per_class=3, size=16, seed=0, max_train_per_class=5)
    assert {k: len(v) for k, v in a.items()} == {"target_train": 15, "replay_train": 35, "target_probe": 9,
                                                  "replay_probe": 21}
    keys = [s.key for v in a.values() for s in v]
    assert len(keys) == len(set(keys))
    assert keys == [s.key for v in b.values() for s in v]
    for name, samples in a.items():
        for s in samples:
            assert (s.label in (0, 1, 2)) == name.startswith("target")
            assert DIGIT_WORDS[s.label] in s.caption or str(s.label) in s.caption
            assert s.key.startswith(f"digit{s.label}_") and s.image.size == (16, 16)
    px = pixels_from_images([s.image for s in a["target_probe"]])
    assert px.shape == (9, 3, 16, 16) and px.min() >= -1 and px.max() <= 1
    assert caption_for(7, 0) == "a handwritten digit seven"


def test_text_stack_token_conventions():
    from anima_ft.lab.text_stack import build_text_encoder, build_tokenizers

    qwen_tok, t5_tok = build_tokenizers(caption_vocabulary())
    t5 = t5_tok("A handwritten digit seven")["input_ids"]
    assert t5[-1] == 1 and all(0 < i < 32128 for i in t5) and len(t5) == 5
    assert t5_tok("")["input_ids"] == [1]
    assert qwen_tok("a handwritten digit seven", add_special_tokens=False)["input_ids"] == [
        qwen_tok.convert_tokens_to_ids(w) for w in ["a", "handwritten", "digit", "seven"]]
    enc = build_text_encoder(caption_vocabulary(), hidden_size=32, seed=0)
    out = enc.encode_unpadded(["a handwritten digit seven", ""])
    assert out[0].qwen_states.shape == (4, 32) and out[1].qwen_states.shape == (0, 32)
    assert out[1].t5_ids.tolist() == [1]
    again = build_text_encoder(caption_vocabulary(), hidden_size=32, seed=0).encode_unpadded(["a handwritten 3"])
    assert torch.equal(again[0].qwen_states, enc.encode_unpadded(["a handwritten 3"])[0].qwen_states)


def _variant(name: str, held: list[float], tgt: list[float], end_images: list[float], drift: dict) -> VariantResult:
    # two sigmas; the second sigma's loss is twice the first
    curve = {"replay_classes": [[v, 2 * v] for v in held], "target_classes": [[v, 2 * v] for v in tgt]}
    return VariantResult(name, f"{name} description", [0, 10, 20], curve, {"replay_classes": end_images}, drift)


def test_report_numbers_follow_the_formulas(tmp_path):
    base = _variant("no_replay", [1.0, 1.2, 1.5], [1.0, 0.8, 0.6], [1.4, 1.5, 1.6, 1.5],
                    {"llm_adapter": 0.02, "dit": 0.05})
    rep = _variant("replay25", [1.0, 1.1, 1.2], [1.0, 0.85, 0.7], [1.1, 1.3, 1.2, 1.2],
                   {"llm_adapter": 0.03, "dit": 0.01})
    assert math.isclose(rise(base, "replay_classes"), 0.5) and math.isclose(rise(rep, "replay_classes"), 0.2)
    d, se = paired_diff(rep.end_per_image["replay_classes"], base.end_per_image["replay_classes"])
    diffs = np.array([-0.3, -0.2, -0.4, -0.3])
    assert math.isclose(d, diffs.mean()) and math.isclose(se, diffs.std(ddof=1) / 2)
    text = "\n".join(interpretation([base, rep], "replay_classes", "target_classes", "no_replay"))
    assert "reduced the rise of held-out loss by 60%" in text  # 1 - 0.2 / 0.5
    assert "more than two standard errors" in text
    assert "adapter moved less than the DiT" in text and "adapter moved more than the DiT" in text
    better = _variant("replay25", [1.0, 0.9, 0.95], [1.0, 1.0, 1.0], [1.4, 1.5, 1.6, 1.5], {})
    assert "prevented the rise of held-out loss entirely: it changed by -5.0%, vs +50.0%" in "\n".join(
        interpretation([base, better], "replay_classes", "target_classes", "no_replay"))
    worse = _variant("replay25", [1.0, 1.4, 1.8], [1.0, 1.0, 1.0], [1.4, 1.5, 1.6, 1.5], {})
    assert "did not reduce" in "\n".join(interpretation([base, worse], "replay_classes", "target_classes",
                                                        "no_replay"))
    meta = {"seed": 3, "sigmas": [0.2, 0.6], "num_noises": 8, "held_out": "replay_classes",
            "target": "target_classes", "baseline": "no_replay", "drift_groups": ["llm_adapter", "dit"]}
    report = write_report(tmp_path, [base, rep], meta).read_text()
    assert "Seed **3**" in report and (tmp_path / "forgetting.png").stat().st_size > 0
    # the mean row of no_replay's held-out table: start 1.5 (mean of 1, 2), end 2.25, +50%
    assert re.search(r"\| replay_classes \| \*\*mean\*\* \| 1\.5000 \| 2\.2500 \| \+0\.7500 \| \+50\.0% \|", report)
    assert "| replay25 | 0.0300 | 0.0100 |" in report


def test_ink_map_and_classifier_reference():
    from anima_ft.lab.classify import DigitClassifier, ink_8x8

    paper, ink = torch.ones(1, 3, 32, 32), -torch.ones(1, 3, 32, 32)
    assert np.allclose(ink_8x8(paper), 0.0) and np.allclose(ink_8x8(ink), 16.0)
    half = torch.ones(1, 3, 16, 16)
    half[..., :, :8] = -1  # left half ink: the left 4 columns of the 8x8 map are full ink
    assert np.allclose(ink_8x8(half).reshape(8, 8), np.repeat([[16.0] * 4 + [0.0] * 4], 8, axis=0))
    # the lab's images (upscaled digits) map back onto the original 8x8 scans up to the bicubic round trip
    splits = load_digit_splits((0, 1, 2), probe_per_class=20, size=32, seed=0, max_train_per_class=60)
    train = splits["target_train"] + splits["replay_train"]
    probe = splits["target_probe"] + splits["replay_probe"]
    clf = DigitClassifier(torch.from_numpy(pixels_from_images([s.image for s in train])), [s.label for s in train])
    acc = clf.accuracy(torch.from_numpy(pixels_from_images([s.image for s in probe])), [s.label for s in probe])
    assert acc > 0.85  # held-out real digits; chance is 0.1


def test_sample_accuracy_table_and_sentences():
    from anima_ft.lab.report import accuracy_table, sample_sentences

    acc = {"base": {"target": 0.3, "replay": 0.2, "n_target": 30, "n_replay": 70},
           "no_replay": {"target": 0.6, "replay": 0.1, "n_target": 30, "n_replay": 70}}
    assert "| no_replay | 60.0% (18/30) | 10.0% (7/70) |" in accuracy_table(acc)
    text = sample_sentences(acc, ["no_replay"])[0]
    se = 100 * math.sqrt(0.1 * 0.9 / 70)
    assert f"reads 10.0% (+- {se:.1f}, binomial s.e.)" in text and "(base model: 20.0%)" in text


def test_redistribution_recipe_is_the_lab_experiment():
    """configs/lab/redistribute.yaml loads, validates, and holds what the variant's report describes."""
    from anima_ft.config import load_config, validate
    from anima_ft.lab.pipeline import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "lab" / "redistribute.yaml")
    validate(cfg, world_size=2, check_files=False)
    d = cfg.distill
    assert d.enabled and d.adapter_source == "reinit" and cfg.optim.lr.llm_adapter == 0
    assert {(t.source, t.kind) for t in d.losses} == {("target", "flow"), ("replay", "distill")}
    assert [st.replay_fraction for st in cfg.stages] == [1.0]
    assert cfg.logging.every_steps == 1  # loss_summary needs every step


def test_loss_summary_means_and_missing_steps(tmp_path):
    import json

    from anima_ft.lab.redistribution import loss_summary

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "probe/x/mean": 1.0}] + [{"step": s, "loss": 1.0 / s, "grad_norm": 0.1 * s}
                                                 for s in range(1, 21)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = loss_summary(path, 20)
    assert got["k"] == 2 and got["first"] == (1.0 + 0.5) / 2 and got["last"] == (1 / 19 + 1 / 20) / 2
    assert got["max_grad_norm"] == 0.1 * 20
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] != 7))
    with pytest.raises(ValueError, match="lacks steps \\[7\\]"):
        loss_summary(path, 20)


def test_codec_global_normalization_keeps_pixel_geometry():
    """normalize=global: one scale for all channels, so latent squared distances are pixel squared distances
    (projected on the PCA subspace) divided by mean(lambda); the variances keep their PCA proportions."""
    from sklearn.decomposition import PCA

    x = _images(40)
    codec = PCAPatchCodec.fit(x, channels=16, normalize="global")
    ref = PCA(n_components=16, svd_solver="full").fit(_to_patches(x, 8).numpy())
    lam = ref.explained_variance_
    assert np.allclose(codec.scale_C.numpy(), np.sqrt(lam.mean()), rtol=1e-6)
    z = codec.encode(x.float()).double().permute(0, 2, 3, 1).reshape(-1, 16)
    assert np.allclose(z.var(0).numpy(), lam / lam.mean(), rtol=1e-4)
    a, b = x[:1].float(), x[1:2].float()
    za, zb = codec.encode(a).double(), codec.encode(b).double()
    pix = (codec.decode(za.float()).double() - codec.decode(zb.float()).double()).pow(2).sum()
    assert math.isclose(float((za - zb).pow(2).sum() * lam.mean()), float(pix), rel_tol=1e-4)
    with pytest.raises(ValueError, match="normalize='pixel'"):
        PCAPatchCodec.fit(x, normalize="pixel")


def test_progress_line_and_torn_metrics(tmp_path):
    from anima_ft.lab.pipeline import last_logged_step, progress_line

    path = tmp_path / "metrics.jsonl"
    assert last_logged_step(path) == 0
    path.write_text('{"step": 0, "probe/x": 1.0}\n{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n{"step": 1')
    assert last_logged_step(path) == 10  # the probe row has no loss; the torn last line is skipped
    assert progress_line("ft_a", 0, 150, 12.3, None) == "ft_a: starting 150 steps (12 s so far)"
    assert progress_line("ft_a", 10, 150, 20.0, (20.0, 10)) == \
        "ft_a: step 10/150 (7%), ETA after the next logged step (20 s so far)"
    # first logged step 10 at 20 s; step 60 at 30 s: 5 steps/s, 90 steps left -> 18 s
    assert progress_line("ft_a", 60, 150, 30.0, (20.0, 10)) == \
        "ft_a: step 60/150 (40%), 5.0 steps/s, ETA 18 s (30 s so far)"


def test_a_run_shorter_than_one_interval_still_logs_its_end(tmp_path, caplog):
    import logging
    import subprocess
    import sys
    import time

    from anima_ft.lab.pipeline import wait_with_progress

    run = tmp_path / "ft_b"
    run.mkdir()
    script = f"open({str(run / 'metrics.jsonl')!r}, 'w').write('{{\"step\": 20, \"loss\": 1.0}}\\n'); raise SystemExit(3)"
    proc = subprocess.Popen([sys.executable, "-c", script])
    with caplog.at_level(logging.INFO, logger="anima_ft.lab.pipeline"):
        assert wait_with_progress(proc, run, 20, time.perf_counter()) == 3
    assert re.search(r"ft_b: finished with exit code 3 at step 20/20 \(\d+ s\)", caplog.text)


def _q1_variant(name: str, held_start: float, held_end: list[float], tgt_start: float, tgt_end: list[float]):
    curve = {"h": [[held_start, held_start], [mean_(held_end)] * 2], "t": [[tgt_start, tgt_start], [mean_(tgt_end)] * 2]}
    return VariantResult(name, name, [0, 10], curve, {"h": held_end, "t": tgt_end})


def mean_(xs):
    return sum(xs) / len(xs)


def test_q1_comparison_follows_its_formulas_and_rule():
    from anima_ft.lab.compare import clear, comparison, markdown

    v = {"no_replay": _q1_variant("no_replay", 1.0, [1.2, 1.3, 1.25, 1.35], 1.0, [0.8, 0.82, 0.79, 0.81]),
         "replay25": _q1_variant("replay25", 1.0, [1.0, 1.05, 1.02, 1.1], 1.0, [0.85, 0.84, 0.86, 0.85]),
         "preserve": _q1_variant("preserve", 1.0, [1.01, 1.04, 1.03, 1.09], 1.0, [0.84, 0.85, 0.85, 0.86]),
         "replay_preserve": _q1_variant("replay_preserve", 1.0, [1.1, 1.2, 1.15, 1.2], 1.0, [0.8, 0.8, 0.8, 0.8]),
         "seed1": _q1_variant("seed1", 1.0, [1.21, 1.32, 1.24, 1.36], 1.0, [0.8, 0.83, 0.8, 0.8])}
    cost = {n: {"step_s": 0.2, "teacher_forwards": 0.0, "global_batch": 32} for n in v}
    r = comparison(v, "seed1", "h", "t", cost)
    assert math.isclose(r["rows"]["no_replay"]["forgetting"], 1.275 - 1)
    assert math.isclose(r["rows"]["replay25"]["target_gain"], 1 - 0.85)
    d, se = r["rows"]["replay25"]["vs_no_replay"]["h"]
    diffs = np.array([-0.2, -0.25, -0.23, -0.25])
    assert math.isclose(d, diffs.mean()) and math.isclose(se, diffs.std(ddof=1) / 2)
    floor = r["noise_floor"]["h"][0]
    assert math.isclose(floor, 0.01 * (1 + 2 - 1 + 1) / 4)
    # replay25 vs preserve: -0.005 +- small, below the floor 0.0075 -> not clear; both clearly beat no_replay
    assert not clear(*r["pairs"]["replay25 - preserve"], floor)
    text = "\n".join(markdown(r, "h", "t"))
    assert "Clearly lower held-out loss than the plain fine-tune" in text and "**replay25**, **preserve**" in text
    assert "**replay25** has the lowest held-out end loss, but it is not clearly distinguishable from **preserve**" in text
    assert "it is clearly below replay_preserve (" in text and "The data do not single out one winner." in text
    assert "Target end loss against the plain fine-tune" in text and "a 0% spread" in text
    assert "| replay25 | +4.2% | +15.0% | -0.2325 +- 0.0118 |" in text


@pytest.mark.parametrize("name", ["ft_no_replay", "ft_replay25", "ft_preserve", "ft_replay_preserve",
                                  "ft_adapter_frozen_first", "pretrain", "q2_dit_first", "q2_concepts_joint",
                                  "q2_concepts_adapter_frozen_first", "q2_redistribute"])
def test_lab_recipes_validate_and_share_steps_and_batch(name):
    """Every lab recipe validates; the Q1 variants differ only in the off-target quarter of the batch."""
    from anima_ft.config import load_config, validate
    from anima_ft.lab.compare import batch_shares
    from anima_ft.lab.pipeline import REPO_ROOT

    path = REPO_ROOT / "configs" / "lab" / f"{name}.yaml"
    cfg = load_config(path)
    validate(cfg, world_size=2, check_files=False)
    want = {"ft_no_replay": (0, 0), "ft_replay25": (0.25, 0), "ft_preserve": (0, 0.25),
            "ft_replay_preserve": (0.125, 0.125)}
    if name in want:
        shares = batch_shares(path, 2)
        assert (shares["replay_flow"], shares["distill"]) == want[name] and shares["global_batch"] == 32
        assert sum(st.num_steps for st in cfg.stages) == 150 and cfg.optim.lr.llm_adapter == 1e-3
        assert cfg.distill.enabled == (name in ("ft_preserve", "ft_replay_preserve"))
        if cfg.distill.enabled:
            assert cfg.distill.adapter_source == "own" and cfg.distill.teacher == "live"


@pytest.mark.parametrize("fails", [False, True])
def test_sample_grids_give_back_the_thread_count(monkeypatch, tmp_path, fails):
    """The grids use every core; the phases after them (redistribution, Question 2) must run at the process's own
    thread count, or their float32 sums differ from the e2e test's recomputation (seen: 5e-8 relative)."""
    from anima_ft.lab import pipeline

    def grids(*args):
        assert torch.get_num_threads() == max(1, min(4, torch.multiprocessing.cpu_count()))
        if fails:
            raise RuntimeError("sampling failed")
        return {"grids": {}, "accuracy": {}}

    monkeypatch.setattr(pipeline, "_make_grids", grids)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="sampling failed"):
                pipeline.make_grids({}, tmp_path, tmp_path / "g", 0, (0,), 1, 1, 1, 1.0)
        else:
            assert pipeline.make_grids({}, tmp_path, tmp_path / "g", 0, (0,), 1, 1, 1, 1.0) == {"grids": {}, "accuracy": {}}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
