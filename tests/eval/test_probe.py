"""Forgetting probe: equals a direct float64 computation, and is independent of set composition and restarts."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import make_samples, randomize_

from anima_ft.eval.probe import ProbeRunner, evaluate_sets, noise_seed, probe_noise

SIGMAS = (0.2, 0.6)
K = 2


def _direct_loss(model, sample, sigma, k_count, seed=0):
    """Independent float64 recomputation: one full forward per noise, batch 1, explicit masks."""
    x0 = sample.latents.double()[None, :, None]
    s = sample.qwen_states.shape[0]
    qwen = torch.zeros(1, max(s, 1), sample.qwen_states.shape[1], dtype=torch.float64)
    qwen[0, :s] = sample.qwen_states.double()
    qmask = torch.arange(max(s, 1))[None] < s
    t5 = sample.t5_ids[None]
    losses = []
    for k in range(k_count):
        eps = probe_noise(sample.key, sigma, k, x0.shape[1:], seed).double()[None]
        x_t = (1 - sigma) * x0 + sigma * eps
        pred = model(x_t, torch.tensor([sigma], dtype=torch.float64), qwen, qmask, t5, torch.ones_like(t5, dtype=torch.bool))
        losses.append(((pred - (eps - x0)) ** 2).mean().item())
    return sum(losses) / len(losses)


def test_noise_is_keyed_not_ordered():
    a = probe_noise("img0", 0.2, 0, (16, 1, 4, 4))
    assert torch.equal(a, probe_noise("img0", 0.2, 0, (16, 1, 4, 4)))
    assert torch.equal(a, probe_noise("img0", 0.2 + 1e-9, 0, (16, 1, 4, 4)))  # sigma rounded to 1e-6
    for other in [("img1", 0.2, 0), ("img0", 0.4, 0), ("img0", 0.2, 1)]:
        assert not torch.equal(a, probe_noise(*other, (16, 1, 4, 4)))
    assert not torch.equal(a, probe_noise("img0", 0.2, 0, (16, 1, 4, 4), seed=1))
    # golden value: changing the hash would silently change every user's probe numbers
    assert noise_seed("img0", 0.2, 0, 0) == 3926089323056594422


def test_probe_equals_direct_float64(tiny_model_f64, samples):
    runner = ProbeRunner({"replay": samples}, sigmas=SIGMAS, num_noises=K)
    got = runner.evaluate(tiny_model_f64)["replay"]
    for j, sigma in enumerate(SIGMAS):
        ref = sum(_direct_loss(tiny_model_f64, s, sigma, K) for s in samples) / len(samples)
        assert got[j].item() == pytest.approx(ref, rel=1e-12, abs=0)
    # the full-forward path gives the same numbers
    full = evaluate_sets(tiny_model_f64, {"replay": samples}, SIGMAS, K, split_context=False)["replay"]
    torch.testing.assert_close(full.mean(0), got, rtol=1e-12, atol=0)


def test_rows_do_not_depend_on_set_composition_or_restart(tiny_model_f64):
    samples = make_samples(n=3)
    full = evaluate_sets(tiny_model_f64, {"a": samples}, SIGMAS, K)["a"]
    alone = evaluate_sets(tiny_model_f64, {"b": samples[1:2]}, SIGMAS, K)["b"]
    assert torch.equal(full[1], alone[0])
    shuffled = evaluate_sets(tiny_model_f64, {"a": samples[::-1]}, SIGMAS, K)["a"]
    assert torch.equal(full, shuffled.flip(0))
    # "restart": a fresh runner on a rebuilt model gives bitwise the same numbers
    from anima_ft.model import AnimaConfig, build_anima


    again = randomize_(build_anima(AnimaConfig.tiny(), dtype=torch.float64, seed=0), seed=1)
    r1 = ProbeRunner({"a": samples}, sigmas=SIGMAS, num_noises=K).evaluate(tiny_model_f64)["a"]
    r2 = ProbeRunner({"a": samples}, sigmas=SIGMAS, num_noises=K).evaluate(again)["a"]
    assert torch.equal(r1, r2)


def test_runner_metrics_and_baseline(tiny_model_f64, samples):
    runner = ProbeRunner({"target": samples[:2], "replay": samples[2:]}, sigmas=SIGMAS, num_noises=2, every_steps=5)
    assert runner.should_run(0) and runner.should_run(10) and not runner.should_run(7)
    m0 = runner.run(tiny_model_f64, 0)
    assert m0["probe/replay/sigma_0.2_rel"] == 1.0 and m0["probe/target/mean_rel"] == 1.0
    assert m0["probe/target/mean"] == pytest.approx((m0["probe/target/sigma_0.2"] + m0["probe/target/sigma_0.6"]) / 2)
    with torch.no_grad():
        for p in tiny_model_f64.parameters():
            p.mul_(1.05)
    m1 = runner.run(tiny_model_f64, 5)
    assert m1["probe/replay/sigma_0.6_rel"] == pytest.approx(m1["probe/replay/sigma_0.6"] / m0["probe/replay/sigma_0.6"])
    assert m1["probe/replay/sigma_0.6_rel"] != 1.0
    restored = ProbeRunner({"target": samples[:2], "replay": samples[2:]}, sigmas=SIGMAS, num_noises=2)
    restored.load_state_dict(runner.state_dict())
    assert restored.run(tiny_model_f64, 5) == m1
    with pytest.raises(ValueError, match="num_noises"):
        ProbeRunner({"a": samples}, sigmas=SIGMAS, num_noises=4).load_state_dict(runner.state_dict())


def test_runner_log_holds_every_image_and_readers_keep_the_last_line_per_step(tmp_path, samples):
    from anima_ft.eval.probe import read_probe_log
    from anima_ft.model import AnimaConfig, build_anima

    model = randomize_(build_anima(AnimaConfig.tiny(), dtype=torch.float64, seed=0), seed=3)
    log = tmp_path / "run" / "probe.jsonl"
    sets = {"target": samples[:2], "replay": samples[2:]}
    runner = ProbeRunner(sets, sigmas=SIGMAS, num_noises=2, every_steps=5, log_path=log)
    m0 = runner.run(model, 0)
    tables = evaluate_sets(model, sets, SIGMAS, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    runner.run(model, 5)
    m5 = runner.run(model, 5)  # a resumed run probes step 5 again
    with open(log, "a") as fh:
        fh.write('{"step": 10, "per_im')  # torn by a crash
    recs = read_probe_log(log)
    assert [r["step"] for r in recs] == [0, 5]
    assert recs[0]["per_image"] == {name: t.tolist() for name, t in tables.items()}
    assert recs[0]["keys"] == {name: [x.key for x in xs] for name, xs in sets.items()}
    assert (recs[0]["sigmas"], recs[0]["num_noises"], recs[0]["seed"]) == (list(SIGMAS), 2, 0)
    assert recs[0]["metrics"] == m0 and recs[1]["metrics"] == m5
    for j, sigma in enumerate(SIGMAS):  # the logged per-image rows average to the logged metrics
        col = [row[j] for row in recs[1]["per_image"]["replay"]]
        assert sum(col) / len(col) == pytest.approx(m5[f"probe/replay/sigma_{sigma}"], rel=1e-12)


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="outside"):
        ProbeRunner({"a": make_samples()}, sigmas=(0.2, 200.0))
    with pytest.raises(ValueError, match="twice"):
        ProbeRunner({"a": make_samples() + make_samples()})
    with pytest.raises(ValueError, match="empty"):
        ProbeRunner({"a": []})
