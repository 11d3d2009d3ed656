"""Question 2's numbers: how much of the new named styles lives in the adapter, how much in the DiT.

For a model B trained from the DiT-first base A, the adapter swap (:mod:`anima_ft.eval.swap`) builds the four
(DiT, adapter) combinations and runs the fixed-sigma probe (:func:`anima_ft.eval.probe.evaluate_sets`) on held-out
styled images, twice: with the tagged caption (``styled``) and with the plain caption (``untagged``; same images,
same keys, so the same noises). Per image, with ``L(d, a)`` the probe loss (mean over the sigmas):

* concept loss: ``L_styled``; its change A -> B is what the model learned about drawing these images from their
  captions;
* name value: ``L_untagged - L_styled``, what the style's name alone is worth; its change A -> B is the named-concept
  knowledge proper.

Each change is split by the symmetric rule of :func:`anima_ft.eval.swap.attribution` (DiT part + adapter part = the
change, exactly; interaction = what exists only with both), per image, then averaged. The adapter share is
``mean(adapter part) / mean(change)``; its standard error comes from a seeded bootstrap over the held-out images,
and differences between models are paired (the same resampled images for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from anima_ft.eval.swap import attribution, load_combination, read_split

PARTS = ("total", "dit", "adapter", "interaction")
SETS = ("styled", "untagged")
N_BOOT = 2000


def pair_key(dit: str, adapter: str) -> str:
    """``"dit|adapter"``: the JSON key of one combination's losses."""
    return f"{dit}|{adapter}"


def image_parts(losses: Mapping[str, Sequence[float]], base: str, model: str) -> dict[str, np.ndarray]:
    """Per-image attribution of the change ``base -> model``: ``{part: float64 [N]}`` for :data:`PARTS`.

    ``losses[pair_key(d, a)]`` holds one value per image for d, a in {base, model}."""
    names = {"A": base, "B": model}
    per = attribution({(d, a): losses[pair_key(names[d], names[a])] for d in "AB" for a in "AB"})
    return {k: np.asarray(per[k], dtype=np.float64) for k in PARTS}


def name_values(losses: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, np.ndarray]:
    """``{pair: untagged - styled per image}`` for every combination probed on both sets."""
    return {k: np.asarray(v["untagged"], dtype=np.float64) - np.asarray(v["styled"], dtype=np.float64)
            for k, v in losses.items()}


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def share_stats(parts: Mapping[str, np.ndarray], seed: int = 0, n_boot: int = N_BOOT) -> dict[str, float]:
    """Means and standard errors (over images) of every part, and the adapter share with its bootstrap s.e."""
    n = len(parts["total"])
    out = {}
    for k in PARTS:
        out[k] = float(parts[k].mean())
        out[f"{k}_se"] = float(parts[k].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    idx = _boot_indices(n, n_boot, seed)
    boot = parts["adapter"][idx].mean(axis=1) / parts["total"][idx].mean(axis=1)
    out["adapter_share"] = out["adapter"] / out["total"]
    out["adapter_share_se"] = float(boot.std(ddof=1))
    out["n_images"] = n
    return out


def share_difference(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], seed: int = 0,
                     n_boot: int = N_BOOT) -> dict[str, float]:
    """Adapter share of ``x`` minus that of ``y`` (same images), with the paired bootstrap s.e."""
    n = len(x["total"])
    if len(y["total"]) != n:
        raise ValueError(f"paired shares need the same images: {n} vs {len(y['total'])}")
    idx = _boot_indices(n, n_boot, seed)

    def share(p, i=None):
        a, t = (p["adapter"], p["total"]) if i is None else (p["adapter"][i], p["total"][i])
        return a.mean(axis=-1) / t.mean(axis=-1)

    boot = share(x, idx) - share(y, idx)
    return {"diff": float(share(x) - share(y)), "se": float(boot.std(ddof=1))}


def kept_fraction(x: np.ndarray, y: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> dict[str, float]:
    """``mean(x) / mean(y)`` (per-image changes of two models on the same images) with its paired bootstrap s.e."""
    idx = _boot_indices(len(x), n_boot, seed)
    boot = x[idx].mean(axis=1) / y[idx].mean(axis=1)
    return {"fraction": float(x.mean() / y.mean()), "se": float(boot.std(ddof=1))}


def same_adapter(a_path: str | Path, b_path: str | Path) -> bool:
    """Whether two checkpoints hold bitwise identical adapters."""
    _, a = read_split(a_path)
    _, b = read_split(b_path)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def probe_pairs(paths: Mapping[str, str | Path], pairs: Sequence[tuple[str, str]], probes: Mapping[str, list],
                sigmas: Sequence[float], num_noises: int, seed: int, log=None) -> dict[str, dict[str, list[float]]]:
    """``{pair_key: {set: per-image loss (mean over sigmas)}}`` of each (DiT, adapter) pair of named checkpoints."""
    from anima_ft.eval.probe import evaluate_sets

    out = {}
    for i, (d, a) in enumerate(pairs):
        if log is not None:
            log(f"probing DiT of {d} with the adapter of {a} ({i + 1} of {len(pairs)})")
        model = load_combination(paths[d], paths[a], dtype=torch.float32)
        per = evaluate_sets(model, probes, sigmas, num_noises, seed)
        out[pair_key(d, a)] = {name: table.mean(dim=1).tolist() for name, table in per.items()}
        del model
    return out


def summarize(losses: Mapping[str, Mapping[str, Sequence[float]]], base: str, models: Sequence[str],
              floor: tuple[str, str], redistributed: str | None, seed: int = 0) -> dict:
    """Every number of the section from the per-image losses: per model the concept-loss and name-value
    attribution; the adapter-frozen-first and redistribution comparisons against the joint model and the noise
    floor (``floor = (joint, joint_seed1)``)."""
    values = name_values(losses)
    concept = {m: image_parts({k: v["styled"] for k, v in losses.items()}, base, m) for m in models}
    named = {m: image_parts(values, base, m) for m in models}
    out: dict = {"models": {m: {"concept": share_stats(concept[m], seed), "name_value": share_stats(named[m], seed)}
                            for m in models}}
    joint, second = floor
    out["floor"] = {"concept": share_difference(concept[second], concept[joint], seed),
                    "name_value": share_difference(named[second], named[joint], seed)}
    out["vs_joint"] = {m: {"concept": share_difference(concept[m], concept[joint], seed),
                           "name_value": share_difference(named[m], named[joint], seed)}
                       for m in models if m not in floor and m != redistributed}
    if redistributed is not None:
        start = pair_key(joint, base)  # the student's starting point: the joint DiT with the base's adapter
        start_concept = np.asarray(losses[start]["styled"]) - np.asarray(losses[pair_key(base, base)]["styled"])
        start_named = values[start] - values[pair_key(base, base)]
        out["redistribution"] = {
            "kept_concept": kept_fraction(concept[redistributed]["total"], concept[joint]["total"], seed),
            "kept_name_value": kept_fraction(named[redistributed]["total"], named[joint]["total"], seed),
            "start_concept": kept_fraction(start_concept, concept[joint]["total"], seed),
            "start_name_value": kept_fraction(start_named, named[joint]["total"], seed),
        }
    out["mean_losses"] = {k: {s: float(np.mean(v[s])) for s in v} for k, v in losses.items()}
    out["base_name_value"] = float(values[pair_key(base, base)].mean())
    return out


def verdict(diff: Mapping[str, float], floor: Mapping[str, float]) -> str:
    """``"differs"`` when ``|diff|`` exceeds both two paired s.e. and the two-seed floor, else ``"within noise"``."""
    return "differs" if abs(diff["diff"]) > max(2 * diff["se"], abs(floor["diff"])) else "within noise"
