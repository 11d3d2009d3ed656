"""Adapter swap and loss attribution: ``anima-ft swap``.

Compose: ``anima-ft swap --dit A.safetensors --adapter B.safetensors OUT.safetensors`` writes A's DiT tensors and
B's ``llm_adapter.*`` tensors (``--adapter init`` re-initializes the adapter with a seed instead) in the official
``net.`` layout. Tensors keep their dtype, so swapping A's own adapter back reproduces A exactly.

Attribute: ``anima-ft swap --attribute A.safetensors B.safetensors --eval-set NAME=PATH ...`` runs the probe on the
four models (DiT_x, adapter_y) for x, y in {A, B} and splits the loss change ``L(B,B) - L(A,A)`` by the symmetric
(Shapley) rule over the two components::

    dit     = ((L(B,A) - L(A,A)) + (L(B,B) - L(A,B))) / 2
    adapter = ((L(A,B) - L(A,A)) + (L(B,B) - L(B,A))) / 2          dit + adapter = L(B,B) - L(A,A) exactly
    interaction = L(B,B) - L(B,A) - L(A,B) + L(A,A)                  (0 when the effects are additive)

with ``L(d, a)`` the loss with d's DiT and a's adapter.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from anima_ft.command_errors import reports_input_errors
from anima_ft.model.groups import is_ignored, strip_prefix

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "llm_adapter."
OFFICIAL_PREFIX = "net."


def read_split(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(dit, adapter)`` tensors of a checkpoint, by official name without prefix (derived buffers dropped).

    A file holding only adapter names without the ``llm_adapter.`` prefix (a separate adapter file) is accepted too.
    A missing file is a FileNotFoundError, a malformed or truncated one a ValueError naming it.
    """
    from anima_ft.model.state_dict import read_header

    read_header(path)  # FileNotFoundError / ValueError naming the file for a missing, malformed or truncated one
    dit, adapter = {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for raw in f.keys():
                name = strip_prefix(raw)
                if is_ignored(name):
                    continue
                (adapter if name.startswith(ADAPTER_PREFIX) else dit)[name] = f.get_tensor(raw)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"could not read tensors from {path}: {exc}") from exc
    if not dit and not adapter:
        raise ValueError(f"{path} holds no Anima tensors")
    if adapter == {} and dit and not any(n.startswith(("blocks.", "x_embedder.")) for n in dit):
        adapter, dit = {ADAPTER_PREFIX + n: t for n, t in dit.items()}, {}  # a bare adapter file
    return dit, adapter


def _shapes_and_dtypes(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``({name: shape}, {name: safetensors dtype name})``, what ``infer_config`` checks."""
    from anima_ft.model.state_dict import dtype_name

    return {n: tuple(t.shape) for n, t in tensors.items()}, {n: dtype_name(t.dtype) for n, t in tensors.items()}


def init_adapter(dit_tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor] | None,
                 seed: int) -> dict[str, torch.Tensor]:
    """Freshly initialized adapter tensors (the model's own init, seeded) for the architecture of ``like``.

    ``like`` is an existing adapter's tensors (their shapes pick the adapter config); when None, the default adapter
    of the DiT's config is used.
    """
    from anima_ft.model import build_anima, infer_config

    tensors = {**dit_tensors, **(like or {})}
    cfg = infer_config(*_shapes_and_dtypes(tensors), where="--dit checkpoint (+ its adapter)")
    if cfg.adapter is None:
        from anima_ft.model import AdapterConfig

        cfg.adapter = AdapterConfig(source_dim=1024, model_dim=cfg.crossattn_emb_channels)
    model = build_anima(cfg, device="cpu", dtype=torch.float32, seed=seed)
    dtype = next(iter((like or dit_tensors).values())).dtype
    return {ADAPTER_PREFIX + n: p.detach().to(dtype).clone() for n, p in model.llm_adapter.state_dict().items()}


def compose(dit_path: str | Path, adapter_path: str | Path | None, out_path: str | Path, seed: int = 0) -> Path:
    """Write ``dit_path``'s DiT + ``adapter_path``'s adapter (``None``: re-initialized with ``seed``) to ``out_path``."""
    from anima_ft.model.state_dict import save_state_dict_atomic

    dit, own_adapter = read_split(dit_path)
    if not dit:
        raise ValueError(f"--dit {dit_path} holds no DiT tensors (only an adapter); pass a full checkpoint")
    if adapter_path is None:
        adapter = init_adapter(dit, own_adapter or None, seed)
        source = f"init(seed={seed})"
    else:
        _, adapter = read_split(adapter_path)
        if not adapter:
            raise ValueError(f"--adapter {adapter_path} holds no llm_adapter tensors")
        source = str(adapter_path)
    width = dit["blocks.0.cross_attn.k_proj.weight"].shape[1] if "blocks.0.cross_attn.k_proj.weight" in dit else None
    out_w = adapter.get(ADAPTER_PREFIX + "out_proj.weight")
    if width is not None and out_w is not None and out_w.shape[0] != width:
        raise ValueError(f"adapter output width {out_w.shape[0]} ({source}) does not match the DiT's context width "
                         f"{width} ({dit_path}); both must come from the same architecture")
    from anima_ft.model import infer_config

    infer_config(*_shapes_and_dtypes({**dit, **adapter}), where=f"--dit {dit_path} with --adapter {source}")
    tensors = {OFFICIAL_PREFIX + n: t.contiguous() for n, t in {**dit, **adapter}.items()}
    meta = {"anima_ft.swap.dit": str(dit_path), "anima_ft.swap.adapter": source, "format": "pt"}
    save_state_dict_atomic(tensors, out_path, meta)
    logger.info("wrote %s: DiT from %s, adapter from %s", out_path, dit_path, source)
    return Path(out_path)


def load_combination(dit_path: str | Path, adapter_path: str | Path, device="cpu", dtype=None) -> torch.nn.Module:
    """An Anima model with ``dit_path``'s DiT and ``adapter_path``'s adapter, built in memory (no file written)."""
    from anima_ft.model import build_anima, infer_config

    dit, _ = read_split(dit_path)
    _, adapter = read_split(adapter_path)
    state = {**dit, **adapter}
    cfg = infer_config(*_shapes_and_dtypes(state), where=f"DiT of {dit_path} with the adapter of {adapter_path}")
    model = build_anima(cfg, device="meta")
    if dtype is not None:
        state = {n: t.to(dtype) for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def attribution(losses: Mapping[tuple[str, str], Sequence[float]]) -> dict[str, list[float]]:
    """Split ``L(B,B) - L(A,A)`` into DiT and adapter parts (module docstring); ``losses[(dit, adapter)]`` per sigma.

    Returns lists (one value per sigma) for ``total``, ``dit``, ``adapter`` and ``interaction``.
    """
    aa, ba, ab, bb = (torch.as_tensor(losses[k], dtype=torch.float64)
                      for k in (("A", "A"), ("B", "A"), ("A", "B"), ("B", "B")))
    return {
        "total": (bb - aa).tolist(),
        "dit": (((ba - aa) + (bb - ab)) / 2).tolist(),
        "adapter": (((ab - aa) + (bb - ba)) / 2).tolist(),
        "interaction": (bb - ba - ab + aa).tolist(),
    }


def attribution_table(per_set: Mapping[str, dict[str, list[float]]], sigmas: Sequence[float]) -> str:
    """Markdown table: per set and sigma, total loss change and the DiT / adapter shares (absolute and percent)."""
    lines = ["| set | sigma | total change | DiT | adapter | DiT % | adapter % | interaction |",
             "|---|---|---|---|---|---|---|---|"]
    for name, parts in per_set.items():
        for j, sigma in enumerate(sigmas):
            tot, d, a, i = (parts[k][j] for k in ("total", "dit", "adapter", "interaction"))
            pd, pa = (f"{100 * x / tot:.1f}%" if tot != 0 else "-" for x in (d, a))
            lines.append(f"| {name} | {sigma:g} | {tot:+.4e} | {d:+.4e} | {a:+.4e} | {pd} | {pa} | {i:+.3e} |")
    return "\n".join(lines)


def run_attribution(a_path: str | Path, b_path: str | Path, eval_sets, sigmas, num_noises: int, seed: int = 0,
                    device="cpu", dtype=None) -> tuple[dict, dict]:
    """Probe the four (DiT, adapter) combinations; returns ``(losses[(d, a)][set] -> [J], attribution per set)``."""
    from anima_ft.eval.probe import ProbeRunner

    runner = ProbeRunner(eval_sets, sigmas, num_noises, seed, progress=True)
    paths = {"A": a_path, "B": b_path}
    losses: dict[tuple[str, str], dict[str, list[float]]] = {}
    for d in "AB":
        for a in "AB":
            model = load_combination(paths[d], paths[a], device=device, dtype=dtype)
            losses[(d, a)] = {k: v.tolist() for k, v in runner.evaluate(model).items()}
            del model
    per_set = {name: attribution({k: v[name] for k, v in losses.items()}) for name in eval_sets}
    return losses, per_set


@reports_input_errors("anima-ft swap")
def main(argv: list[str]) -> int:
    """``anima-ft swap --dit A --adapter B|init OUT`` or ``anima-ft swap --attribute A B --eval-set NAME=PATH``."""
    from anima_ft.eval.probe_inputs import add_probe_args, eval_sets_from_args, resolve_dtype

    ap = argparse.ArgumentParser(prog="anima-ft swap", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="output .safetensors (compose mode)")
    ap.add_argument("--dit", help="checkpoint whose DiT is kept")
    ap.add_argument("--adapter", help="checkpoint (or bare adapter file) whose llm_adapter is used; 'init' = fresh")
    ap.add_argument("--seed-init", type=int, default=0, help="seed of the re-initialized adapter (--adapter init)")
    ap.add_argument("--attribute", nargs=2, metavar=("A", "B"), help="attribute the probe loss change A -> B")
    add_probe_args(ap)
    args = ap.parse_args(argv)
    if args.attribute:
        eval_sets = eval_sets_from_args(args)
        losses, per_set = run_attribution(*args.attribute, eval_sets, args.sigmas, args.num_noises, args.seed,
                                          args.device, resolve_dtype(args.dtype))
        print("loss with (DiT, adapter) from (A, B) = " + ", ".join(map(str, args.attribute)))
        for (d, a), per in losses.items():
            print(f"  L(DiT {d}, adapter {a}): " + "; ".join(f"{k}: {[round(x, 6) for x in v]}" for k, v in per.items()))
        table = attribution_table(per_set, args.sigmas)
        print(table)
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.out_dir) / "attribution.md").write_text(table + "\n")
        return 0
    if not (args.dit and args.adapter and args.out):
        ap.error("compose mode needs --dit A --adapter B|init OUT (or use --attribute A B)")
    compose(args.dit, None if args.adapter == "init" else args.adapter, args.out, args.seed_init)
    print(f"wrote {args.out}")
    return 0
