"""Question 1 of the lab: replay or output preservation? The comparison section of ``report.md``.

Inputs: the fine-tunes' :class:`~anima_ft.lab.report.VariantResult` (probe curves and end-of-run per-image losses,
the same fixed images, sigmas and noises in every run) and each run's ``metrics.jsonl`` and resolved config. All
variants take the same number of steps and samples per step; they differ only in how the off-target share of every
batch is spent. Definitions (per-image loss ``l_i`` = mean over the probe sigmas at the last step)::

    forgetting(v)   = mean_i l_i^v(held-out) / mean_i l_i^base(held-out) - 1      (relative rise over the fine-tune)
    target gain(v)  = 1 - mean_i l_i^v(target) / mean_i l_i^base(target)          (relative fall on the target)
    paired diff     = mean_i (l_i^a - l_i^b) with s.e. = sd_i(l^a - l^b) / sqrt(n)  (same images and noises)
    noise floor     = the paired diff of the plain fine-tune against itself with another training seed

A difference is called clear only if |diff| > 2 s.e. **and** |diff| > |noise floor| of the same set: the s.e. covers
the probe images, the floor covers run-to-run training noise (data order, training noise draws).
Compute: step time = global batch / the median logged ``samples_per_s``; teacher forwards per step = the distill
share of the batch (the live teacher runs only on distill rows, forward only).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from anima_ft.lab.report import VariantResult, mean, paired_diff

Q1_VARIANTS = ("no_replay", "replay25", "preserve", "replay_preserve")


def batch_shares(config_path: Path, world: int) -> dict[str, float]:
    """``{"global_batch", "replay_flow", "distill"}``: the global batch and the shares of it that are replay images
    with the flow loss and images with the distill (preservation) loss, from the run's resolved config and its
    ``world`` (data-parallel ranks; global batch = micro x accumulation x ranks)."""
    from anima_ft.config import load_config

    cfg = load_config(config_path)
    st = cfg.stages[0]
    if st.replay_fraction >= 0:
        weights = {s.name: 0.0 for s in cfg.data.sources} | {"target": 1 - st.replay_fraction,
                                                               "replay": st.replay_fraction}
    else:
        total = sum(s.weight for s in cfg.data.sources)
        weights = {s.name: s.weight / total for s in cfg.data.sources}
    kinds = {t.source: t.kind for t in cfg.distill.losses} if cfg.distill.enabled else {}
    distill = sum(w for name, w in weights.items() if kinds.get(name) == "distill")
    replay_flow = sum(w for name, w in weights.items() if name != "target" and kinds.get(name, "flow") == "flow")
    return {"global_batch": cfg.batch.micro_batch_size * cfg.batch.grad_accum_steps * world,
            "replay_flow": replay_flow, "distill": distill}


def step_seconds(metrics_path: Path, global_batch: int) -> float:
    """Median seconds per optimizer step over the logged training rows (``global_batch / samples_per_s``)."""
    from anima_ft.observability.metrics import read_metrics

    rates = [row["samples_per_s"] for row in read_metrics(metrics_path).values()
             if "loss" in row and row.get("samples_per_s")]
    if not rates:
        raise ValueError(f"{metrics_path} has no training rows with samples_per_s")
    return global_batch / statistics.median(rates)


def _start(v: VariantResult, s: str) -> float:
    return mean(v.curve[s][0])


def comparison(variants: dict[str, VariantResult], floor_name: str, held_out: str, target: str,
               compute: dict[str, dict]) -> dict:
    """Every number of the section: per variant its forgetting, target gain, paired diffs against no_replay (both
    sets), compute; the noise floor; the pairwise held-out diffs among the treatments; the verdict."""
    base = variants["no_replay"]
    floor = variants[floor_name]
    sets = (held_out, target)
    noise = {s: paired_diff(floor.end_per_image[s], base.end_per_image[s]) for s in sets}
    rows = {}
    for name in [n for n in Q1_VARIANTS if n in variants] + [floor_name]:
        v = variants[name]
        end = {s: mean(v.end_per_image[s]) for s in sets}
        rows[name] = {
            "forgetting": end[held_out] / _start(v, held_out) - 1,
            "target_gain": 1 - end[target] / _start(v, target),
            "vs_no_replay": {s: paired_diff(v.end_per_image[s], base.end_per_image[s]) for s in sets},
            **compute[name],
        }
    treatments = [n for n in Q1_VARIANTS[1:] if n in variants]
    pairs = {}
    for i, a in enumerate(treatments):
        for b in treatments[i + 1:]:
            pairs[f"{a} - {b}"] = paired_diff(variants[a].end_per_image[held_out], variants[b].end_per_image[held_out])
    return {"rows": rows, "noise_floor": noise, "pairs": pairs, "treatments": treatments, "floor_name": floor_name,
            "verdict": verdict(rows, pairs, noise[held_out][0], treatments, held_out)}


def clear(d: float, se: float, floor: float) -> bool:
    """The module docstring's rule: ``|d| > 2 s.e.`` and ``|d| > |noise floor|``."""
    return abs(d) > 2 * se and abs(d) > abs(floor)


def verdict(rows: dict, pairs: dict, floor: float, treatments: list[str], held_out: str) -> list[str]:
    """Sentences: which treatments clearly reduced forgetting against no_replay, and which (if any) beat the others."""
    out = []
    helped = [n for n in treatments if rows[n]["vs_no_replay"][held_out][0] < 0
              and clear(*rows[n]["vs_no_replay"][held_out], floor)]
    if not helped:
        out.append("No treatment lowered the held-out loss clearly (by more than two s.e. and more than the seed "
                   "noise floor) against the plain fine-tune.")
    else:
        out.append("Clearly lower held-out loss than the plain fine-tune (more than two s.e. and more than the seed "
                   f"noise floor {floor:+.4f}): " + ", ".join(f"**{n}**" for n in helped) + ".")
    best = min(treatments, key=lambda n: rows[n]["vs_no_replay"][held_out][0])
    beaten = []
    for other in treatments:
        if other == best:
            continue
        key, sign = (f"{best} - {other}", 1) if f"{best} - {other}" in pairs else (f"{other} - {best}", -1)
        d, se = pairs[key]
        beaten.append((other, sign * d, se, clear(d, se, floor)))
    wins = [f"{o} ({d:+.4f} +- {se:.4f})" for o, d, se, c in beaten if c]
    ties = [f"**{o}** ({d:+.4f} +- {se:.4f})" for o, d, se, c in beaten if not c]
    if not ties:
        out.append(f"**{best}** controlled forgetting best: its held-out end loss is clearly below every other "
                   f"treatment's (vs {'; vs '.join(wins)}).")
    else:
        out.append(f"**{best}** has the lowest held-out end loss, but it is not clearly distinguishable from "
                   + ", ".join(ties) + f" (noise floor {floor:+.4f})"
                   + (f"; it is clearly below {', '.join(wins)}" if wins else "")
                   + ". The data do not single out one winner.")
    return out


def target_sentence(rows: dict, treatments: list[str], target: str, floor: float) -> str:
    """What each treatment cost on the target (end loss vs no_replay, clear or not by the same rule)."""
    parts = []
    for n in treatments:
        d, se = rows[n]["vs_no_replay"][target]
        parts.append(f"{n} {d:+.4f} +- {se:.4f} ({'clear' if clear(d, se, floor) else 'not clear'})")
    return ("Target end loss against the plain fine-tune (positive = less target gain; rule as above with the "
            f"target noise floor {floor:+.4f}): " + "; ".join(parts) + ".")


def timing_sentence(rows: dict, floor_name: str) -> str:
    """How far the step-time column can be trusted: the two no_replay seeds cost the same by construction."""
    a, b = rows["no_replay"]["step_s"], rows[floor_name]["step_s"]
    spread = abs(a - b) / min(a, b)
    return (f"Step times are medians of the logged `samples_per_s` on the machine as it was loaded: the two plain "
            f"fine-tunes (identical cost by construction) measured {a:.3f} s and {b:.3f} s, a {100 * spread:.0f}% "
            "spread, so step-time differences below that are load, not cost. The teacher-forward column is exact: "
            "a preservation sample adds one forward pass of the frozen base (no backward) to the student's forward "
            "and backward.")


def markdown(result: dict, held_out: str, target: str) -> list[str]:
    """The section's markdown lines (table, noise floor, pairwise differences, verdict)."""
    floor_name = result["floor_name"]
    lines = ["## Question 1: replay or output preservation?", "",
             "Same base, steps and samples per step; the off-target quarter of every batch is spent on replay "
             "(flow loss on replay-class images), on preservation (the squared difference to the frozen base "
             "model's velocity on the same replay-class images and captions; `distill.enabled`, the student's own "
             "adapter), or half on each. End = the last probe; paired differences are over the same held-out "
             "images, sigmas and noises (1 s.e.).", "",
             f"| variant | forgetting ({held_out}) | target gain ({target}) | held-out end - no_replay | "
             "target end - no_replay | step time (s) | teacher forwards per step |", "|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        (dh, sh), (dt, st) = r["vs_no_replay"][held_out], r["vs_no_replay"][target]
        lines.append(f"| {name} | {100 * r['forgetting']:+.1f}% | {100 * r['target_gain']:+.1f}% | "
                     f"{dh:+.4f} +- {sh:.4f} | {dt:+.4f} +- {st:.4f} | {r['step_s']:.3f} | "
                     f"{r['teacher_forwards']:g} of {r['global_batch']} |")
    (fh, fsh), (ft, fst) = result["noise_floor"][held_out], result["noise_floor"][target]
    lines += ["", f"Noise floor: `{floor_name}` (the plain fine-tune with the next training seed) differs from "
              f"`no_replay` by {fh:+.4f} +- {fsh:.4f} on the held-out images and {ft:+.4f} +- {fst:.4f} on the "
              "target images.", "", "Pairwise held-out end differences among the treatments:", ""]
    lines += [f"- {k}: {d:+.4f} +- {se:.4f}" for k, (d, se) in result["pairs"].items()]
    rows, floor_t = result["rows"], result["noise_floor"][target][0]
    lines += [""] + [f"- {s}" for s in result["verdict"]]
    lines += [f"- {target_sentence(rows, result['treatments'], target, floor_t)}", f"- {timing_sentence(rows, floor_name)}",
              ""]
    return lines
