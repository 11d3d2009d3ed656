"""Question 2's parts (anima_ft/lab/styles.py, concept_share.py, concept_report.py, classify.StyleClassifier):
style transforms against numpy references, the splits' pairing, the attribution and share arithmetic against
brute-force float64 formulas, and the report against the summary it is written from."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from anima_ft.lab import concept_report, concept_share, styles


@pytest.fixture(scope="module")
def splits():
    return styles.load_style_splits(probe_per_class=3, size=32, seed=0, max_train_per_class=12)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB")).astype(np.int64)


def test_styles_match_numpy_references(splits):
    img = splits["plain_train"][5].image
    x = _arr(img)
    np.testing.assert_array_equal(_arr(styles.apply_style(img, "kurogane")), 255 - x)
    np.testing.assert_array_equal(_arr(styles.apply_style(img, "tsukimi")), x[:, ::-1])
    framed = _arr(styles.apply_style(img, "hoshimi"))
    f = styles.FRAME_PX
    assert (framed[:f] == 0).all() and (framed[-f:] == 0).all() and (framed[:, :f] == 0).all()
    assert (framed[:, -f:] == 0).all()
    np.testing.assert_array_equal(framed[f:-f, f:-f], x[f:-f, f:-f])
    bold = _arr(styles.apply_style(img, "sakura"))
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    ref = np.min([padded[i:i + x.shape[0], j:j + x.shape[1]] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_array_equal(bold[1:-1, 1:-1], ref[1:-1, 1:-1])  # interior: the 3x3 minimum (ink spreads)
    assert bold.sum() < x.sum()  # more ink
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        styles.apply_style(img, "nope")


def test_splits_pair_styled_and_untagged_probes(splits):
    styled, untagged = splits["styled_probe"], splits["untagged_probe"]
    assert [s.key for s in styled] == [s.key for s in untagged]
    plain_keys = {s.key for s in splits["plain_probe"]}
    train_keys = {s.key for s in splits["plain_train"]}
    assert not plain_keys & train_keys  # held-out images are never trained on
    for s, u in zip(styled, untagged):
        style = styles.style_of(s.key)
        assert s.key.rsplit("_", 1)[0] in plain_keys and style in styles.STYLES
        assert s.caption == styles.tagged(u.caption, style) == f"{u.caption} by {style}"
        assert styles.style_of(u.key) == style and _arr(s.image).tolist() == _arr(u.image).tolist()
    for name in ("styled_train", "styled_probe"):
        counts = [sum(styles.style_of(s.key) == st for s in splits[name]) for st in styles.STYLE_NAMES]
        assert max(counts) - min(counts) <= 1, (name, counts)  # the styles get equal shares
    assert all(styles.style_of(s.key) is None for s in splits["plain_train"] + splits["plain_probe"])
    again = styles.load_style_splits(probe_per_class=3, size=32, seed=0, max_train_per_class=12)
    assert [s.caption for s in again["styled_train"]] == [s.caption for s in splits["styled_train"]]


def test_style_vocabulary_covers_every_caption(splits):
    from anima_ft.lab.text_stack import build_tokenizers

    qwen, t5 = build_tokenizers(styles.style_vocabulary())
    for name, samples in splits.items():
        for s in samples:
            assert qwen.unk_token_id not in qwen(s.caption)["input_ids"], (name, s.caption)
            assert t5.unk_token_id not in t5(s.caption)["input_ids"], (name, s.caption)


def test_style_classifier_reads_real_styled_images():
    from anima_ft.lab.classify import StyleClassifier
    from anima_ft.lab.digits import pixels_from_images

    splits = styles.load_style_splits(probe_per_class=6, size=32, seed=0, max_train_per_class=40)
    index = {None: 0, **{s: i + 1 for i, s in enumerate(styles.STYLE_NAMES)}}
    train = splits["plain_train"] + splits["styled_train"]
    clf = StyleClassifier(torch.from_numpy(pixels_from_images([s.image for s in train])),
                          [index[styles.style_of(s.key)] for s in train], [s.label for s in train])
    probe = splits["styled_probe"]
    got_style, got_digit = clf.predict(torch.from_numpy(pixels_from_images([s.image for s in probe])))
    want = np.asarray([index[styles.style_of(s.key)] for s in probe])
    assert np.mean(got_style == want) >= 0.85  # 60 held-out images (0.92 measured): the classifier is a usable judge of style
    assert np.mean(got_digit == np.asarray([s.label for s in probe])) >= 0.8  # chance is 10% (0.9 measured)


def _synthetic(n=400, seed=0):
    """Per-image losses L(d, a) = base + dit effect of d + adapter effect of a + interaction (known truth)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 1.0, n)
    out, truth = {}, {}
    for m, (dit, ad, inter) in {"m1": (-0.02, -0.06, 0.0), "m2": (-0.04, -0.04, -0.01)}.items():
        d = dit + rng.normal(0, 0.005, n)
        a = ad + rng.normal(0, 0.005, n)
        i = inter + rng.normal(0, 0.001, n)
        truth[m] = (d, a, i)
        out[f"A|{m}"] = {"styled": base + a, "untagged": base + 0.5 * a}
        out[f"{m}|A"] = {"styled": base + d, "untagged": base + 0.5 * d}
        out[f"{m}|{m}"] = {"styled": base + d + a + i, "untagged": base + 0.5 * (d + a + i)}
    out["A|A"] = {"styled": base, "untagged": base}
    return {k: {s: v.tolist() for s, v in d.items()} for k, d in out.items()}, truth


def test_image_parts_match_the_symmetric_rule_in_float64():
    losses, truth = _synthetic()
    parts = concept_share.image_parts({k: v["styled"] for k, v in losses.items()}, "A", "m2")
    d, a, i = truth["m2"]
    np.testing.assert_allclose(parts["total"], d + a + i, atol=1e-12)
    np.testing.assert_allclose(parts["dit"], d + i / 2, atol=1e-12)  # the interaction splits evenly
    np.testing.assert_allclose(parts["adapter"], a + i / 2, atol=1e-12)
    np.testing.assert_allclose(parts["interaction"], i, atol=1e-12)
    np.testing.assert_allclose(parts["dit"] + parts["adapter"], parts["total"], atol=1e-15)


def test_share_stats_and_bootstrap_against_formulas():
    rng = np.random.default_rng(1)
    n = 2000
    a = rng.normal(0.6, 0.1, n)
    parts = {"total": np.ones(n), "adapter": a, "dit": 1 - a, "interaction": np.zeros(n)}
    s = concept_share.share_stats(parts, seed=3)
    assert s["adapter_share"] == pytest.approx(a.mean())
    analytic = a.std(ddof=1) / np.sqrt(n)  # total is constant: the share is a plain mean
    assert s["adapter_share_se"] == pytest.approx(analytic, rel=0.1)
    assert s["adapter_se"] == pytest.approx(analytic)
    assert concept_share.share_stats(parts, seed=3) == s  # seeded
    same = concept_share.share_difference(parts, parts, seed=0)
    assert same == {"diff": 0.0, "se": 0.0}
    kept = concept_share.kept_fraction(0.5 * parts["adapter"], parts["adapter"])
    assert kept["fraction"] == pytest.approx(0.5) and kept["se"] == pytest.approx(0.0, abs=1e-12)
    assert concept_share.verdict({"diff": 0.1, "se": 0.02}, {"diff": 0.05}) == "differs"
    assert concept_share.verdict({"diff": 0.1, "se": 0.06}, {"diff": 0.05}) == "within noise"
    assert concept_share.verdict({"diff": -0.1, "se": 0.01}, {"diff": 0.2}) == "within noise"


def test_summarize_recovers_known_shares_and_the_report_prints_them():
    losses, truth = _synthetic()
    summary = concept_share.summarize(losses, "A", ["m1", "m2"], ("m1", "m2"), None, seed=0)
    d, a, i = truth["m1"]
    assert summary["models"]["m1"]["concept"]["adapter_share"] == pytest.approx((a + i / 2).mean() / (d + a + i).mean())
    # name value = untagged - styled = -0.5 x the styled change, so its shares equal the concept's
    assert summary["models"]["m1"]["name_value"]["adapter_share"] == pytest.approx(
        summary["models"]["m1"]["concept"]["adapter_share"])
    assert summary["models"]["m1"]["concept"]["adapter_share"] == pytest.approx(0.75, abs=0.01)
    assert summary["floor"]["concept"]["diff"] == pytest.approx(
        summary["models"]["m2"]["concept"]["adapter_share"] - summary["models"]["m1"]["concept"]["adapter_share"])
    assert summary["mean_losses"]["A|A"]["styled"] == pytest.approx(np.mean(losses["A|A"]["styled"]))
    assert summary["base_name_value"] == pytest.approx(np.mean(losses["A|A"]["untagged"]) - np.mean(losses["A|A"]["styled"]))
    lines = concept_report._table({"joint": summary["models"]["m1"]}, "concept")
    s = summary["models"]["m1"]["concept"]
    assert re.search(re.escape(concept_report.pct(s["adapter_share"], s["adapter_share_se"])) + r" \|$", lines[-1])
    assert concept_report.num(s["total"], s["total_se"]) in lines[-1]


def test_q2_recipes_are_the_documented_experiment():
    from anima_ft.config import load_config
    from anima_ft.lab.pipeline import REPO_ROOT

    lab = REPO_ROOT / "configs" / "lab"
    base, joint = load_config(lab / "q2_dit_first.yaml"), load_config(lab / "q2_concepts_joint.yaml")
    ff, red = load_config(lab / "q2_concepts_adapter_frozen_first.yaml"), load_config(lab / "q2_redistribute.yaml")
    assert base.optim.lr.llm_adapter == 0 and not base.model.init_path and base.optim.lr.cross_attn > 0
    lrs = {g: getattr(joint.optim.lr, g) for g in ("base", "self_attn", "cross_attn", "mlp", "mod", "llm_adapter")}
    assert set(lrs.values()) == {1e-3}  # jointly: every group at the same LR
    for cfg in (joint, ff, red):
        assert [(s.name, s.weight) for s in cfg.data.sources] == [("styled", 0.5), ("plain", 0.5)]
        assert sum(st.num_steps for st in cfg.stages) == 150 and cfg.batch.micro_batch_size == 16
    assert [st.lr.llm_adapter for st in ff.stages] == [0.0, -1.0] and [st.num_steps for st in ff.stages] == [75, 75]
    assert red.distill.enabled and red.distill.adapter_source == "own" and red.optim.lr.llm_adapter == 0
    assert {(t.source, t.kind) for t in red.distill.losses} == {("styled", "distill"), ("plain", "distill")}


def test_reuse_fingerprints_see_changed_inputs(tmp_path):
    """A run is reused only if it read the same files: the init checkpoint's bytes and the shard listing count."""
    from anima_ft.lab.pipeline import input_fingerprints

    ckpt, shards = tmp_path / "base.safetensors", tmp_path / "shards"
    ckpt.write_bytes(b"one")
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"x")
    args = [f"model.init_path={ckpt}", f"data.sources.0.shards=[{shards}]", "run.seed=0",
            f"eval.sets=[{{name: s, path: '{shards}'}}]", f"run.dir={tmp_path / 'missing'}"]
    first = input_fingerprints(args)
    assert set(first) == {str(ckpt), str(shards)}
    ckpt.write_bytes(b"two")
    second = input_fingerprints(args)
    assert second[str(ckpt)] != first[str(ckpt)] and second[str(shards)] == first[str(shards)]
    (shards / "b.tar").write_bytes(b"y")
    assert input_fingerprints(args)[str(shards)] != second[str(shards)]
