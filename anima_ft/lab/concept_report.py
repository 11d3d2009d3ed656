"""Question 2's section of the lab report (``q2/concepts.md``), written from ``q2/concepts.json`` alone.

Every number is read from the result that :func:`anima_ft.lab.concepts.run_question2` saved; the lab's end-to-end
test recomputes them from the runs' files.
"""

from __future__ import annotations

import math
from pathlib import Path

from anima_ft.lab import styles

MODEL_LABELS = {
    "joint": "joint (adapter + DiT together, Anima's recipe)",
    "joint_seed1": "joint, training seed + 1 (noise floor)",
    "adapter_frozen_first": "adapter frozen first (DiT alone for the first half)",
    "redistributed": "redistributed (joint DiT + base adapter, distilled from joint)",
}


def pct(x: float, se: float | None = None) -> str:
    """``"64.1%"`` or ``"64.1% +- 3.2%"``."""
    return f"{100 * x:.1f}%" + ("" if se is None else f" +- {100 * se:.1f}%")


def num(x: float, se: float | None = None) -> str:
    """``"-1.234e-02"`` or ``"-1.234e-02 +- 1.0e-03"``."""
    return f"{x:+.3e}" + ("" if se is None else f" +- {se:.1e}")


def _table(models: dict, kind: str) -> list[str]:
    lines = ["| model | change from the base | DiT part | adapter part | interaction | adapter share |",
             "|---|---|---|---|---|---|"]
    for m, stats in models.items():
        s = stats[kind]
        lines.append(f"| {MODEL_LABELS.get(m, m)} | {num(s['total'], s['total_se'])} | {num(s['dit'], s['dit_se'])} | "
                     f"{num(s['adapter'], s['adapter_se'])} | {num(s['interaction'], s['interaction_se'])} | "
                     f"{pct(s['adapter_share'], s['adapter_share_se'])} |")
    return lines


def comparison_lines(summary: dict) -> list[str]:
    """The interpretation: the joint share, the floor, adapter-frozen-first and redistribution against joint."""
    from anima_ft.lab.concept_share import verdict

    joint = summary["models"]["joint"]
    floor = summary["floor"]
    out = []
    for kind, what in (("name_value", "named-concept knowledge (the name value)"),
                       ("concept", "concept-loss gain")):
        s = joint[kind]
        out.append(f"- Joint training put {pct(s['adapter_share'], s['adapter_share_se'])} of the {what} in the "
                   f"adapter and {pct(s['dit'] / s['total'])} in the DiT (interaction {num(s['interaction'])}). "
                   f"The second seed: {pct(summary['models']['joint_seed1'][kind]['adapter_share'])} (difference "
                   f"{pct(floor[kind]['diff'], floor[kind]['se'])}, the noise floor).")
    for m, diffs in summary.get("vs_joint", {}).items():
        for kind, what in (("name_value", "name value"), ("concept", "concept-loss gain")):
            d = diffs[kind]
            out.append(f"- {MODEL_LABELS.get(m, m)}: adapter share of the {what} "
                       f"{pct(summary['models'][m][kind]['adapter_share'])}, {pct(d['diff'], d['se'])} against "
                       f"joint: {verdict(d, floor[kind])} (|difference| against 2 paired s.e. and the floor "
                       f"{pct(abs(floor[kind]['diff']))}).")
    red = summary.get("redistribution")
    if red:
        out.append(f"- Redistribution: the student keeps the base's adapter, so its adapter share is 0 by "
                   f"construction; what counts is how much of the joint model's gain its DiT alone carries: "
                   f"{pct(red['kept_name_value']['fraction'], red['kept_name_value']['se'])} of the name value and "
                   f"{pct(red['kept_concept']['fraction'], red['kept_concept']['se'])} of the concept-loss gain, "
                   f"against {pct(red['start_name_value']['fraction'], red['start_name_value']['se'])} and "
                   f"{pct(red['start_concept']['fraction'], red['start_concept']['se'])} for the same DiT-with-base-"
                   "adapter pair before the distillation (the joint DiT's own part).")
    return out


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` over ``n`` samples."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def write_markdown(result: dict, q2_dir: Path) -> Path:
    """``q2_dir/concepts.md`` from the saved result; returns its path."""
    summary, probe, st = result["summary"], result["probe"], result["settings"]
    c = result["counts"]
    legend = ", ".join(f"`{name}` ({what})" for name, what in styles.STYLES.items())
    lines = [
        "# Question 2: where does a new concept's knowledge go?", "",
        "The base is built the way Anima was, in miniature: a DiT pretrained first, then the adapter trained "
        "jointly with it on new named concepts.", "",
        f"- DiT-first base: {st['pretrain_steps']} steps on the plain digits ({c['plain_train']} images, all ten "
        "classes) with the adapter frozen at its random init, the stand-in for the fixed text encoder the DiT was "
        "pretrained with (`configs/lab/q2_dit_first.yaml`).",
        f"- New concepts: four named styles, {legend}. A styled caption is the plain caption + `by <name>`; no "
        f"base caption holds the names. {c['styled_train']} styled training images (each once, in one style).",
        f"- From the base, {st['finetune_steps']} steps on half styled, half plain digits: `joint` (every group, "
        "LR 1e-3), `joint_seed1` (the next training seed: the noise floor), `adapter_frozen_first` (adapter LR 0 "
        "for the first half); `redistribute`: the joint DiT with the base's adapter (frozen), trained on the "
        "distill loss against the joint model on the same data.",
        f"- Attribution: the adapter swap against the base on {len(probe['keys'])} held-out styled images, probed "
        f"with the tagged caption and with the plain caption (same image, same noises), sigmas "
        f"{probe['sigmas']}, {probe['num_noises']} noises each, seed {probe['seed']}. Per image: concept loss = "
        "probe loss with the tagged caption; name value = loss with the plain caption - loss with the tagged "
        "caption. Each change from the base is split into a DiT and an adapter part (they sum to the change), "
        "per image, then averaged (+- s.e. over images); shares +- a bootstrap s.e. over images, differences "
        "paired.", "",
        "## Named-concept knowledge (name value)", "",
        f"Base: {num(summary['base_name_value'])}"
        " (the base has never seen the names).", "",
        *_table(summary["models"], "name_value"), "",
        "## Concept loss (styled images, tagged caption)", "",
        *_table(summary["models"], "concept"), "",
        "## What it says", "",
        *comparison_lines(summary), "",
        "## In the samples", "",
        "Samples for `a handwritten digit <word> by <style>` (styled prompts) and `a handwritten digit <word>` "
        "(plain prompts), read by a logistic-regression classifier of (style, digit) fitted on the training "
        "images; rows of the grids are plain + the styles, columns the digits.", "",
        "| checkpoint | styled prompts: style read as prompted | styled prompts: digit read as prompted | "
        "samples | plain prompts: digit read as prompted | samples |", "|---|---|---|---|---|---|",
    ]
    for label, r in result["samples"]["accuracy"].items():
        plain = "-" if r["plain_digit"] is None else pct(r["plain_digit"], binomial_se(r["plain_digit"], r["n_plain"]))
        lines.append(f"| {label} | {pct(r['style'], binomial_se(r['style'], r['n']))} | "
                     f"{pct(r['digit'], binomial_se(r['digit'], r['n']))} | {r['n']} | {plain} | {r['n_plain']} |")
    lines.append("")
    for label, path in result["samples"]["grids"].items():
        lines.append(f"![{label}]({Path(path).relative_to(q2_dir.parent)})")  # as seen from report.md
    path = q2_dir / "concepts.md"
    path.write_text("\n".join(lines) + "\n")
    return path
