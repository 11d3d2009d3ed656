"""Did the knowledge move? Teacher gaps of (DiT, adapter) pairings before and after redistribution.

For a model M and the frozen teacher T, on an eval set of N samples with J fixed sigmas and K fixed noises each
(the probe's noises, ``anima_ft.eval.probe.probe_noise``)::

    gap_j(M) = 1/(N K) sum_i sum_k mean_elements( (v_M(x_t, s_j, c_i) - v_T(x_t, s_j, c_i))^2 )
    rel_j(M) = gap_j(M) / (1/(N K) sum_i sum_k mean_elements(v_T^2))

The redistribution check pairs DiTs with one re-initialized adapter R (seeded, untrained):

    before = gap(DiT_T + R)      after = gap(DiT_S + R)      shift = 1 - after / before

``shift > 0`` means the student's DiT, with an adapter that knows nothing, keeps more of the teacher's behaviour than
the original DiT did: knowledge moved from the adapter into the DiT. The table also lists the paired models' own
gaps and, through :func:`anima_ft.eval.swap.attribution`, the Shapley split of ``gap(DiT_S + R) - gap(DiT_T + A_T)``
into DiT and adapter parts (A = (DiT_T, A_T), B = (DiT_S, R)).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from anima_ft.eval.eval_sets import EvalSample, collate_condition
from anima_ft.eval.probe import probe_noise
from anima_ft.eval.swap import attribution

from .context import core_module, fresh_adapter


def pair(dit_model: nn.Module, adapter: nn.Module) -> nn.Module:
    """A copy of ``dit_model`` whose ``llm_adapter`` is a copy of ``adapter`` (eval mode)."""
    model = copy.deepcopy(core_module(dit_model))
    model.llm_adapter = copy.deepcopy(adapter)
    return model.eval()


def reinit_adapter(model: nn.Module, seed: int) -> nn.Module:
    """A freshly initialized adapter of ``model``'s adapter architecture (seeded, the model's own init)."""
    core = core_module(model)
    return fresh_adapter(core.llm_adapter.cfg, seed, core.llm_adapter).eval()


@torch.no_grad()
def teacher_gaps(models: dict[str, nn.Module], teacher: nn.Module, samples: Sequence[EvalSample],
                 sigmas: Sequence[float], num_noises: int = 4, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """``{name: {"gap": [J], "rel": [J]}}`` in float64 (module docstring) for every model, the teacher's velocity
    computed once per (sample, sigma) and compared with each model's (one teacher pass instead of one per model);
    all models are plain modules in eval mode."""
    if not samples:
        raise ValueError("teacher_gap needs at least one eval sample")
    models = {name: core_module(m).eval() for name, m in models.items()}
    teacher = core_module(teacher).eval()
    dtype = next(teacher.parameters()).dtype
    device = next(teacher.parameters()).device
    for name, m in models.items():
        p = next(m.parameters())
        if (p.dtype, p.device) != (dtype, device):
            raise ValueError(f"teacher_gaps: model {name!r} is {p.dtype} on {p.device}, the teacher {dtype} on {device}; "
                             "load them with the same dtype and device")
    err = {name: torch.zeros(len(sigmas), dtype=torch.float64) for name in models}
    ref = torch.zeros(len(sigmas), dtype=torch.float64)
    for s in samples:
        cond = collate_condition(s, device, dtype)
        args = (cond["qwen_states"], cond["qwen_mask"], cond["t5_ids"], cond["t5_mask"])
        ctx_t = teacher.encode_context(*args)
        ctx = {name: m.encode_context(*args) for name, m in models.items()}
        x_0 = s.latents.to(device=device, dtype=torch.float32)[None, :, None]  # [1, C, 1, h, w]
        for j, sigma in enumerate(sigmas):
            eps = torch.stack([probe_noise(s.key, sigma, k, x_0.shape[1:], seed) for k in range(num_noises)])
            x_t = ((1 - sigma) * x_0 + sigma * eps.to(device)).to(dtype)  # [K, C, 1, h, w]
            t = torch.full((num_noises,), sigma, device=device, dtype=dtype)
            v_t = teacher.denoise(x_t, t, ctx_t.expand(num_noises, -1, -1)).double()
            for name, m in models.items():
                v_m = m.denoise(x_t, t, ctx[name].expand(num_noises, -1, -1)).double()
                err[name][j] += (v_m - v_t).pow(2).flatten(1).mean(1).sum().cpu()
            ref[j] += v_t.pow(2).flatten(1).mean(1).sum().cpu()
    n = len(samples) * num_noises
    return {name: {"gap": (e / n).tolist(), "rel": (e / ref).tolist()} for name, e in err.items()}


def teacher_gap(model: nn.Module, teacher: nn.Module, samples: Sequence[EvalSample], sigmas: Sequence[float],
                num_noises: int = 4, seed: int = 0) -> dict[str, list[float]]:
    """``{"gap": [J], "rel": [J]}`` of one model (:func:`teacher_gaps`)."""
    return teacher_gaps({"model": model}, teacher, samples, sigmas, num_noises, seed)["model"]


def redistribution(teacher: nn.Module, student: nn.Module, samples: Sequence[EvalSample], sigmas: Sequence[float],
                   reinit_seed: int, num_noises: int = 4, seed: int = 0,
                   references: dict[str, nn.Module] | None = None) -> dict:
    """Teacher gaps of the pairings (module docstring): ``{"rows": {name: gap dict}, "shift": [J], "split": ...}``.

    ``references``: other models (e.g. a plain fine-tune of the same length) whose DiT is also paired with R, as the
    fair baseline when the student was fine-tuned as well as distilled.
    """
    R = reinit_adapter(teacher, reinit_seed)
    T, S = core_module(teacher), core_module(student)
    paired = {
        "teacher DiT + re-init adapter (before)": pair(T, R),
        "student DiT + re-init adapter (after)": pair(S, R),
        "student DiT + its own adapter": S,
        "student DiT + teacher adapter": pair(S, T.llm_adapter),
    }
    for name, ref in (references or {}).items():
        paired[f"{name} DiT + re-init adapter"] = pair(ref, R)
    rows = teacher_gaps(paired, T, samples, sigmas, num_noises, seed)  # the teacher runs once, not once per row
    before = rows["teacher DiT + re-init adapter (before)"]["gap"]
    after = rows["student DiT + re-init adapter (after)"]["gap"]
    shift = [1.0 - a / b if b > 0 else 0.0 for a, b in zip(after, before)]
    losses = {("A", "A"): [0.0] * len(sigmas), ("B", "A"): rows["student DiT + teacher adapter"]["gap"],
              ("A", "B"): before, ("B", "B"): after}
    return {"rows": rows, "shift": shift, "split": attribution(losses), "sigmas": list(sigmas)}


def redistribution_table(result: dict) -> str:
    """Markdown: gap and relative gap per pairing and sigma, then the shift and the DiT/adapter split."""
    sig = result["sigmas"]
    head = " | ".join(f"sigma {s:g}" for s in sig)
    lines = [f"| pairing (vs teacher) | {head} |", "|---|" + "---|" * len(sig)]
    for name, r in result["rows"].items():
        cells = " | ".join(f"{g:.3e} ({100 * q:.1f}%)" for g, q in zip(r["gap"], r["rel"]))
        lines.append(f"| {name} | {cells} |")
    lines.append("| shift = 1 - after/before | " + " | ".join(f"{x:+.3f}" for x in result["shift"]) + " |")
    split = result["split"]
    lines.append("| Shapley: DiT part of the gap | " + " | ".join(f"{x:+.3e}" for x in split["dit"]) + " |")
    lines.append("| Shapley: adapter part of the gap | " + " | ".join(f"{x:+.3e}" for x in split["adapter"]) + " |")
    return "\n".join(lines)
