"""The lab report: ``report.md`` plus PNG plots, written only from the run's metrics files.

Inputs (all produced by :mod:`anima_ft.lab.run`): per fine-tune variant, the probe curve (mean probe loss per eval
set and sigma at each probed step, ``curves.json`` in the variant's directory) and the end-of-run per-image probe
tables; the drift table (relative weight change of the adapter and DiT groups against the base model). Every number
in the text is computed here from those inputs; the interpretation sentences are chosen by comparing the numbers,
never written in advance.

Definitions used in the text (``mean`` = average over the probe sigmas, then over images):

    rise(set)     = L_end(set) / L_start(set) - 1          (relative change of the probe loss over the fine-tune)
    reduction     = 1 - rise(variant) / rise(no_replay)   (how much of the no-replay forgetting a variant avoided)
    paired diff   = mean_i (l_i^variant - l_i^no_replay)  at the end, with its standard error over images i
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class VariantResult:
    """One fine-tune variant as the report needs it.

    steps: probed optimizer steps (first = start = the base model). curve[set][k][j]: mean probe loss over the set's
    images at ``steps[k]`` and sigma j. end_per_image[set]: per-image loss at the last step, averaged over sigmas,
    in a fixed key order shared by all variants. drift: ``{group: relative change vs base}``.
    """

    name: str
    description: str
    steps: list[int]
    curve: dict[str, list[list[float]]]
    end_per_image: dict[str, list[float]] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0


def mean(xs) -> float:
    """Arithmetic mean of a non-empty sequence."""
    xs = list(xs)
    return sum(xs) / len(xs)


def curve_means(v: VariantResult, set_name: str) -> list[float]:
    """Mean over sigmas of the probe loss at each probed step."""
    return [mean(row) for row in v.curve[set_name]]


def rise(v: VariantResult, set_name: str) -> float:
    """Relative change of the sigma-mean probe loss from the first to the last probed step."""
    m = curve_means(v, set_name)
    return m[-1] / m[0] - 1.0


def paired_diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """``(mean(a - b), standard error)`` over paired per-image values."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired difference needs two equal-length lists of >= 2 values, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m = mean(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, math.sqrt(var / len(d))


def forgetting_plot(variants: list[VariantResult], set_names: list[str], path: Path) -> Path:
    """One panel per eval set: sigma-mean probe loss against step, one line per variant."""
    fig, axes = plt.subplots(1, len(set_names), figsize=(5.5 * len(set_names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], set_names):
        for v in variants:
            ax.plot(v.steps, curve_means(v, name), marker="o", markersize=3, label=v.name)
        ax.set_title(f"probe loss on '{name}' images (mean over sigmas)")
        ax.set_xlabel("fine-tune step")
        ax.set_ylabel("probe loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drift_plot(variants: list[VariantResult], groups: list[str], path: Path) -> Path:
    """Grouped bars: relative weight change per group kind, one bar per variant."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * len(variants) / 2), 4.0))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v.drift.get(g, float("nan")) for g in groups], width=width, label=v.name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("||W_end - W_base|| / ||W_base||")
    ax.set_title("weight drift against the base model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _pct(x: float) -> str:
    return f"{100.0 * x:+.1f}%"


def probe_table(v: VariantResult, sigmas: list[float]) -> list[str]:
    """Markdown rows: per set and sigma, the probe loss at start and end, absolute and relative change."""
    lines = ["| set | sigma | start | end | end - start | end / start - 1 |", "|---|---|---|---|---|---|"]
    for name, rows in v.curve.items():
        for j, s in enumerate(sigmas + ["mean"]):
            a = rows[0][j] if j < len(sigmas) else mean(rows[0])
            b = rows[-1][j] if j < len(sigmas) else mean(rows[-1])
            label = f"{s:g}" if j < len(sigmas) else "**mean**"
            lines.append(f"| {name} | {label} | {_fmt(a)} | {_fmt(b)} | {b - a:+.4f} | {_pct(b / a - 1)} |")
    return lines


def drift_table(variants: list[VariantResult], groups: list[str]) -> list[str]:
    """Markdown: one row per variant, one column per group kind (relative change against the base model)."""
    lines = ["| variant | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for v in variants:
        lines.append(f"| {v.name} | " + " | ".join(_fmt(v.drift.get(g, float("nan"))) for g in groups) + " |")
    return lines


def interpretation(variants: list[VariantResult], held_out: str, target: str, baseline: str) -> list[str]:
    """Sentences derived from the numbers: forgetting per variant, what replay/freezing changed, where drift went."""
    by_name = {v.name: v for v in variants}
    out = []
    for v in variants:
        r, t = rise(v, held_out), rise(v, target)
        verb = "rose" if r > 0 else "fell"
        out.append(f"- **{v.name}**: held-out ({held_out}) probe loss {verb} by {_pct(r)} over the fine-tune; "
                   f"target ({target}) probe loss changed by {_pct(t)}.")
    base = by_name.get(baseline)
    if base is None:
        return out
    r0 = rise(base, held_out)
    for v in variants:
        if v.name == baseline:
            continue
        r = rise(v, held_out)
        if r0 <= 0:
            text = (f"the {baseline} run showed no rise of held-out loss ({_pct(r0)}), so this run cannot show "
                    f"a reduction of forgetting (its own change: {_pct(r)})")
        elif r <= 0:
            text = (f"prevented the rise of held-out loss entirely: it changed by {_pct(r)}, vs {_pct(r0)} for "
                    f"{baseline}")
        elif r < r0:
            text = f"reduced the rise of held-out loss by {100 * (1 - r / r0):.0f}% ({_pct(r)} vs {_pct(r0)})"
        else:
            text = f"did not reduce the rise of held-out loss ({_pct(r)} vs {_pct(r0)} for {baseline})"
        sig = ""
        if v.end_per_image.get(held_out) and base.end_per_image.get(held_out):
            d, se = paired_diff(v.end_per_image[held_out], base.end_per_image[held_out])
            clear = abs(d) > 2 * se
            sig = (f" End-of-run paired difference vs {baseline} on the held-out images: {d:+.4f} +- {se:.4f} "
                   f"(1 s.e.), {'more' if clear else 'less'} than two standard errors"
                   f"{'' if clear else ', so not clearly distinguishable at this size'}.")
        out.append(f"- **{v.name}** {text}.{sig}")
    for v in variants:
        if "llm_adapter" in v.drift and "dit" in v.drift:
            a, d = v.drift["llm_adapter"], v.drift["dit"]
            more = "more" if a > d else "less"
            text = (f"- **{v.name}**: relative to the base weights, the adapter moved {more} than the DiT "
                    f"({_fmt(a)} vs {_fmt(d)}, ratio {a / d:.2f})")
            if "adapter_blocks" in v.drift:
                b = v.drift["adapter_blocks"]
                text += (f"; without its T5 embedding table (mostly rows no caption uses) the adapter moved "
                         f"{_fmt(b)}, {'more' if b > d else 'less'} than the DiT (ratio {b / d:.2f})")
            out.append(text + ".")
    return out


def accuracy_table(acc: dict[str, dict[str, float]]) -> list[str]:
    """Markdown: one row per checkpoint, sample accuracy for target-class and replay-class prompts."""
    def cell(a: dict, g: str) -> str:
        n = a[f"n_{g}"]
        return f"{100 * a[g]:.1f}% ({round(a[g] * n)}/{n})"

    lines = ["| images | target-class prompts | replay-class prompts |", "|---|---|---|"]
    lines += [f"| {name} | {cell(a, 'target')} | {cell(a, 'replay')} |" for name, a in acc.items()]
    return lines


def sample_sentences(acc: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    """One sentence per variant: classifier accuracy of its samples against the base model's, per prompt group."""
    if "base" not in acc:
        return []
    b = acc["base"]
    out = []
    for name in names:
        if name in acc:
            a = acc[name]
            se = {g: 100 * math.sqrt(max(a[g] * (1 - a[g]), 1e-12) / a[f"n_{g}"]) for g in ("replay", "target")}
            out.append(f"- **{name}** samples: the digit classifier reads {100 * a['replay']:.1f}% "
                       f"(+- {se['replay']:.1f}, binomial s.e.) of replay-class prompts' samples as the prompted "
                       f"digit (base model: {100 * b['replay']:.1f}%) and {100 * a['target']:.1f}% "
                       f"(+- {se['target']:.1f}) for target-class prompts (base: {100 * b['target']:.1f}%).")
    return out


def write_report(out_dir: Path, variants: list[VariantResult], meta: dict) -> Path:
    """Write ``report.md``, ``forgetting.png`` and ``drift.png`` into ``out_dir``; returns the report path.

    ``meta`` keys: ``seed``, ``sigmas``, ``num_noises``, ``held_out`` / ``target`` (set names), ``baseline`` (the
    no-replay variant's name), ``drift_groups``, ``grids`` ({title: png path relative to out_dir}), ``configs``
    ({name: resolved config path relative to out_dir}), ``setup`` (list of markdown lines), ``timings`` ({step: s});
    optional ``extra_sections`` (markdown lines placed after the interpretation) and ``load_average``.
    """
    out_dir = Path(out_dir)
    sets = [meta["held_out"], meta["target"]]
    forgetting_plot(variants, sets, out_dir / "forgetting.png")
    drift_plot(variants, meta["drift_groups"], out_dir / "drift.png")
    lines = ["# anima_ft mini-lab: forgetting and replay on handwritten digits", ""]
    lines += [f"Seed **{meta['seed']}**. Probe: sigmas {', '.join(f'{s:g}' for s in meta['sigmas'])}, "
              f"{meta['num_noises']} fixed noises per (image, sigma).", ""]
    lines += ["## Setup", ""] + list(meta.get("setup", [])) + [""]
    if meta.get("failed"):
        lines += ["## Failed variants", "", "These fine-tunes did not finish; they are missing from every table below.",
                  ""]
        for name, err in meta["failed"].items():
            lines += [f"- **{name}**:", "", "```", err.strip()[-1500:], "```", ""]
    lines += ["## What the numbers say", ""]
    lines += interpretation(variants, meta["held_out"], meta["target"], meta["baseline"])
    lines += sample_sentences(meta.get("sample_accuracy", {}), [v.name for v in variants]) + [""]
    lines += list(meta.get("extra_sections", []))
    lines += ["## Forgetting curves", "", "![forgetting curves](forgetting.png)", ""]
    lines += ["## Probe loss per variant (start = the base model, end = the last step)", ""]
    for v in variants:
        lines += [f"### {v.name}", "", v.description, ""] + probe_table(v, list(meta["sigmas"])) + [""]
    lines += ["## Weight drift against the base model", "",
              "Relative change ||W_end - W_base|| / ||W_base|| over all tensors of each group.", ""]
    lines += drift_table(variants, meta["drift_groups"]) + ["", "![drift](drift.png)", ""]
    if meta.get("grids"):
        lines += ["## Samples (decoded by the PCA patch codec)", ""]
        if meta.get("sample_accuracy"):
            lines += ["Share of samples that a digit classifier (logistic regression on 8x8 ink maps, fitted on the "
                      "training images) reads as the prompted digit; chance is 10%. The first row is the same "
                      "classifier on held-out real images after the codec round trip.", ""]
            lines += accuracy_table(meta["sample_accuracy"]) + [""]
        for title, rel in meta["grids"].items():
            lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
    if meta.get("timings"):
        cpu = meta.get("cpu_seconds", {})
        lines += ["## Timings", "", "Wall-clock seconds of each step, and the CPU seconds it used (user + system, "
                  "the training ranks included; on an idle 2-core machine a 2-rank run needs at least CPU / 2 of "
                  "wall clock).", "", "| step | seconds | CPU seconds |", "|---|---|---|"]
        lines += [f"| {k} | {'reused' if s is None else f'{s:.1f}'} | "
                  f"{f'{cpu[k]:.1f}' if k in cpu else '-'} |" for k, s in meta["timings"].items()] + [""]
        if meta.get("load_average"):
            lines += ["Load average (1, 5, 15 min) of the machine when the report was written: "
                      + ", ".join(f"{x:.2f}" for x in meta["load_average"]) + ".", ""]
    if meta.get("configs"):
        lines += ["## Resolved configs", "", "Each run's full resolved training config (defaults < recipe < the lab's "
                  "overrides), as the trainer wrote it into its run directory.", ""]
        for name, rel in meta["configs"].items():
            text = (out_dir / rel).read_text() if (out_dir / rel).exists() else "(missing)"
            lines += [f"<details><summary>{name}: {rel}</summary>", "", "```yaml", text.rstrip(), "```", "",
                      "</details>", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
