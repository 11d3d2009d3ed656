"""Weight drift between checkpoints: ``anima-ft drift A.safetensors B.safetensors [C ...]``.

For a reference tensor ``a`` and a later tensor ``b`` (float64 math):

    rel(a, b) = ||b - a|| / ||a||          cos(a, b) = <a, b> / (||a|| ||b||)

Group values treat all the group's tensors as one concatenated vector, so they are built from the summed statistics
``sum ||b-a||^2``, ``sum ||a||^2``, ``sum ||b||^2`` and ``sum <a,b>`` (:class:`DriftStats`). Every file after the
first is compared with the first (``--chain``: each with the one before it). Files are read with ``safe_open`` one
tensor at a time, so two full models never sit in memory. Tensors present in only one file (e.g. the LLM adapter when
comparing Cosmos-Predict2 with Anima) are listed and skipped; a shape mismatch is an error.

Outputs: a markdown table on stdout (and ``--out-dir/drift.md``), ``drift_groups.csv``, ``drift_tensors.csv`` and
``drift_heatmap.png`` (groups x comparisons, colour = relative change, log scale).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from anima_ft.command_errors import reports_input_errors
from anima_ft.model.groups import drift_group as group_of
from anima_ft.model.groups import group_sort_key, is_ignored, strip_prefix
from anima_ft.model.groups import lr_group_of_drift_group as kind_of
from anima_ft.model.state_dict import read_header

logger = logging.getLogger(__name__)


@dataclass
class DriftStats:
    """Additive float64 sums for a tensor or a group: ``sq_diff = ||b-a||^2``, ``sq_a``, ``sq_b``, ``dot = <a,b>``."""

    sq_diff: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    numel: int = 0

    def __iadd__(self, other: DriftStats) -> DriftStats:
        self.sq_diff += other.sq_diff
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.dot += other.dot
        self.numel += other.numel
        return self

    @property
    def rel(self) -> float:
        """``||b - a|| / ||a||`` (inf when ``a`` is all zero and ``b`` is not, 0 when both are zero)."""
        return rel_and_cos(self.sq_diff, self.sq_a, self.sq_b, self.dot)[0]

    @property
    def cos(self) -> float:
        """Cosine similarity ``<a, b> / (||a|| ||b||)`` (1.0 when both are zero, nan when exactly one is)."""
        return rel_and_cos(self.sq_diff, self.sq_a, self.sq_b, self.dot)[1]


def rel_and_cos(sq_diff: float, sq_a: float, sq_b: float, dot: float) -> tuple[float, float]:
    """``(||b-a|| / ||a||, <a,b> / (||a|| ||b||))`` from the four sums, with the zero-norm cases of DriftStats."""
    rel = math.sqrt(sq_diff / sq_a) if sq_a > 0 else (0.0 if sq_diff == 0 else math.inf)
    if sq_a == 0 and sq_b == 0:
        cos = 1.0
    elif sq_a == 0 or sq_b == 0:
        cos = math.nan
    else:
        cos = dot / math.sqrt(sq_a * sq_b)
    return rel, cos


def tensor_stats(a: torch.Tensor, b: torch.Tensor) -> DriftStats:
    """Float64 drift sums of two same-shape tensors."""
    a64, b64 = a.double(), b.double()
    return DriftStats(
        sq_diff=float((b64 - a64).pow(2).sum()),
        sq_a=float(a64.pow(2).sum()),
        sq_b=float(b64.pow(2).sum()),
        dot=float((a64 * b64).sum()),
        numel=a.numel(),
    )


def checkpoint_names(path: str | Path) -> dict[str, str]:
    """``{official name without prefix: name in the file}`` for a safetensors file, skipping ignored buffers."""
    read_header(path)  # a malformed or truncated file is a ValueError naming it, before safetensors reads it
    with safe_open(str(path), framework="pt") as f:
        names = {}
        for raw in f.keys():
            name = strip_prefix(raw)
            if is_ignored(name):
                continue
            if name in names:
                raise ValueError(f"{path}: tensors {names[name]!r} and {raw!r} both map to {name!r}; keep one prefix")
            names[name] = raw
    return names


@dataclass
class Comparison:
    """Result of comparing two checkpoint files."""

    label: str
    tensors: dict[str, DriftStats]
    groups: dict[str, DriftStats]
    only_in_a: list[str]
    only_in_b: list[str]


def compare_files(a_path: str | Path, b_path: str | Path, label: str | None = None,
                  progress: bool = False) -> Comparison:
    """Per-tensor and per-group drift of ``b_path`` relative to ``a_path`` (tensors loaded one pair at a time;
    ``progress`` shows a bar over the tensors)."""
    from tqdm import tqdm

    names_a, names_b = checkpoint_names(a_path), checkpoint_names(b_path)
    common = sorted(set(names_a) & set(names_b))
    tensors: dict[str, DriftStats] = {}
    with safe_open(str(a_path), framework="pt") as fa, safe_open(str(b_path), framework="pt") as fb:
        for name in tqdm(common, desc=f"drift {Path(b_path).name}", unit="tensor", disable=not progress,
                         dynamic_ncols=True):
            shape_a = tuple(fa.get_slice(names_a[name]).get_shape())
            shape_b = tuple(fb.get_slice(names_b[name]).get_shape())
            if shape_a != shape_b:
                raise ValueError(
                    f"tensor {name!r} has shape {shape_a} in {a_path} but {shape_b} in {b_path}: drift needs two "
                    "checkpoints of the same architecture (same width and block count)"
                )
            tensors[name] = tensor_stats(fa.get_tensor(names_a[name]), fb.get_tensor(names_b[name]))
    groups = aggregate(tensors)
    only_a, only_b = sorted(set(names_a) - set(names_b)), sorted(set(names_b) - set(names_a))
    for side, missing, path in (("first", only_a, b_path), ("second", only_b, a_path)):
        if missing:
            logger.warning("%d tensors of the %s file are absent from %s and skipped (e.g. %s)",
                           len(missing), side, path, missing[:3])
    return Comparison(label or f"{Path(b_path).stem} vs {Path(a_path).stem}", tensors, groups, only_a, only_b)


def aggregate(tensors: dict[str, DriftStats], key=group_of) -> dict[str, DriftStats]:
    """Sum tensor statistics into groups (``key(name) -> group``), in display order."""
    groups: dict[str, DriftStats] = defaultdict(DriftStats)
    for name, st in tensors.items():
        groups[key(name)] += st
    return {g: groups[g] for g in sorted(groups, key=group_sort_key)}


def kind_table(groups: dict[str, DriftStats]) -> dict[str, DriftStats]:
    """Coarse summary: sum drift groups into the six LR groups they lie in (``llm_adapter``, ``self_attn``, ...,
    ``mod``, ``base``) plus ``total``."""
    kinds: dict[str, DriftStats] = defaultdict(DriftStats)
    for g, st in groups.items():
        kinds[kind_of(g)] += st
        kinds["total"] += st
    return dict(kinds)


def markdown_table(comparisons: Sequence[Comparison]) -> str:
    """Markdown table: one row per group, a ``rel`` and a ``cos`` column per comparison."""
    groups = sorted({g for c in comparisons for g in c.groups}, key=group_sort_key)
    head = "| group | params | " + " | ".join(f"rel {c.label} | cos {c.label}" for c in comparisons) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(comparisons))]
    for g in groups + ["total"]:
        stats = [c.groups.get(g) if g != "total" else kind_table(c.groups)["total"] for c in comparisons]
        numel = next((s.numel for s in stats if s is not None), 0)
        cells = " | ".join("- | -" if s is None else f"{s.rel:.3e} | {s.cos:.6f}" for s in stats)
        lines.append(f"| {g} | {numel:,} | {cells} |")
    return "\n".join(lines)


def write_csvs(comparisons: Sequence[Comparison], out_dir: Path) -> None:
    """``drift_groups.csv`` and ``drift_tensors.csv`` (comparison, name, numel, rel, cos) in ``out_dir``."""
    for fname, attr in (("drift_groups.csv", "groups"), ("drift_tensors.csv", "tensors")):
        with open(out_dir / fname, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["comparison", "group" if attr == "groups" else "tensor", "numel", "rel_change", "cosine"])
            for c in comparisons:
                for name, st in getattr(c, attr).items():
                    w.writerow([c.label, name, st.numel, repr(st.rel), repr(st.cos)])


def _pairs(paths: Sequence[str], chain: bool) -> Iterator[tuple[str, str]]:
    for i in range(1, len(paths)):
        yield (paths[i - 1] if chain else paths[0]), paths[i]


@reports_input_errors("anima-ft drift")
def main(argv: list[str]) -> int:
    """``anima-ft drift A B [C ...]``: drift of each later file against A (or its predecessor with --chain)."""
    ap = argparse.ArgumentParser(prog="anima-ft drift", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="two or more .safetensors files (net./model.diffusion_model./bare)")
    ap.add_argument("--chain", action="store_true", help="compare each file with the previous one, not with the first")
    ap.add_argument("--labels", default=None, help="comma-separated short names for the files, e.g. cosmos,p1,p2")
    ap.add_argument("--out-dir", default=None, help="where to write drift.md, the CSVs and drift_heatmap.png")
    args = ap.parse_args(argv)
    if len(args.checkpoints) < 2:
        ap.error("give at least two checkpoints")
    labels = args.labels.split(",") if args.labels else [Path(p).stem for p in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        ap.error(f"--labels has {len(labels)} names for {len(args.checkpoints)} checkpoints")
    label_of = dict(zip(args.checkpoints, labels))
    comparisons = [compare_files(a, b, f"{label_of[b]} vs {label_of[a]}", progress=True)
                   for a, b in _pairs(args.checkpoints, args.chain)]
    table = markdown_table(comparisons)
    print(table)
    for c in comparisons:
        if c.only_in_a or c.only_in_b:
            print(f"\n{c.label}: skipped {len(c.only_in_a)} tensors only in the reference, "
                  f"{len(c.only_in_b)} only in the compared file")
    if args.out_dir:
        from anima_ft.eval.plots import drift_heatmap

        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.md").write_text(table + "\n")
        write_csvs(comparisons, out)
        drift_heatmap(comparisons, out / "drift_heatmap.png")
        print(f"\nwrote {out}/drift.md, drift_groups.csv, drift_tensors.csv, drift_heatmap.png")
    return 0
