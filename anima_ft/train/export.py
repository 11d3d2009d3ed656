"""``anima-ft export RUN_OR_CHECKPOINT OUT.safetensors``: ZeRO shards -> one bf16 file in the official layout.

The fp32 master weights are reassembled on the CPU from the ZeRO-1/2/3 shard files with DeepSpeed's
``zero_to_fp32`` reader (trainable parameters from the optimizer shards, frozen ones from the model-state files),
so no GPU ever holds the full model. The result is written through ``anima_ft.model.save_anima``: ``net.`` keys,
adapter included, bf16, with the model config and the resolved training config in the metadata. ``--ema`` writes
the EMA of the weights instead, as its own file.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
EMA_KEY = "ema"  # the optimizer-state entry that holds the EMA (engine.update_ema writes it, state_view reads it)


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """A complete checkpoint directory from a run dir, a checkpoints dir, or a checkpoint dir itself."""
    path = Path(path)
    if (path / "trainer.json").is_file() and tag is None:
        return path
    for root in (path / "checkpoints", path):
        if tag is not None and (root / tag / "trainer.json").is_file():
            return root / tag
        if tag is None and (root / "latest").is_file():
            ckpt = root / (root / "latest").read_text().strip()
            if (ckpt / "trainer.json").is_file():
                return ckpt
    what = f"checkpoint {tag!r}" if tag else "complete checkpoint (trainer.json) or 'latest' file"
    raise ValueError(f"{path}: found no {what}; pass a run directory, its checkpoints/ directory or a step_* directory")


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 ``{name: tensor}`` (internal names, no ``net.``) assembled on CPU from the ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    # ZeRO-1 checkpoints carry no frozen-parameter fragments; frozen weights are exact in the module state instead
    model_states = ckpt / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        module = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
        for name, tensor in module.items():
            name = name.removeprefix("module.")
            if name not in sd and tensor.numel() > 0:
                sd[name] = tensor.float()
    return sd


def ema_view(ckpt: Path, into: Path) -> Path:
    """A copy of ``ckpt`` (links + rewritten optimizer shards) whose fp32 master partitions are the EMA partitions.

    The EMA is stored as the ``"ema"`` optimizer-state entry of each flat fp32 partition (``engine.update_ema``);
    putting it where the master partitions go lets DeepSpeed's own reader reassemble it. Frozen parameters come
    from the model-state files, which is right: their EMA equals their (constant) value.
    """
    return state_view(ckpt, into, EMA_KEY)


def state_view(ckpt: Path, into: Path, key: str) -> Path:
    """``into/<ckpt name>``: ``ckpt`` with the optimizer-state entry ``key`` (``ema``, ``exp_avg``, ``exp_avg_sq``)
    in place of the fp32 master partitions, so DeepSpeed's readers (zero_to_fp32, ds_to_universal) see it as weights.
    """
    view = into / ckpt.name
    view.mkdir(parents=True)
    for f in sorted(ckpt.iterdir()):
        if not f.name.endswith("optim_states.pt"):
            (view / f.name).symlink_to(f.resolve())
            continue
        sd = torch.load(f, map_location="cpu", weights_only=False)
        osd = sd["optimizer_state_dict"]
        masters_key, base = (("fp32_flat_groups", osd["optimizer_state_dict"]) if "fp32_flat_groups" in osd
                             else ("single_partition_of_fp32_groups", osd["base_optimizer_state"]))
        states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        masters = osd[masters_key]
        if any(key not in states.get(i, {}) for i in range(len(masters))):
            hint = " (train with ema.decay > 0)" if key == EMA_KEY else ""
            raise ValueError(f"{ckpt} holds no {key!r} optimizer state{hint}, so it cannot be read as weights")
        osd[masters_key] = [states[i][key].reshape(-1)[: m.numel()].reshape(m.shape).clone()
                            for i, m in enumerate(masters)]
        torch.save(sd, view / f.name)
    return view


def export_checkpoint(ckpt: Path, out: Path, ema: bool = False) -> Path:
    """Write ``out`` (official bf16 single file) from the checkpoint ``ckpt`` (its EMA with ``ema``)."""
    from anima_ft.model import AnimaConfig, build_anima, save_anima

    state = json.loads((ckpt / "trainer.json").read_text())
    if "model_config" not in state:
        raise ValueError(f"{ckpt}/trainer.json has no model_config; it was not written by anima_ft's trainer")
    model = build_anima(AnimaConfig.from_dict(state["model_config"]), device="meta")
    if ema:
        with tempfile.TemporaryDirectory() as tmp:
            sd = fp32_state_dict(ema_view(ckpt, Path(tmp)))
    else:
        sd = fp32_state_dict(ckpt)
    expected = dict(model.state_dict())
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt}: shard tensors do not match the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    model.load_state_dict(sd, strict=True, assign=True)
    meta = {"anima_ft.step": str(state["step"]), "anima_ft.samples_seen": str(state["samples_seen"]),
            "anima_ft.weights": "ema" if ema else "trained"}
    if "train_config" in state:
        meta["anima_ft.train_config"] = state["train_config"]
    save_anima(model, out, metadata=meta)
    logger.info("exported %s (step %d) to %s", ckpt, state["step"], out)
    return Path(out)


def main(argv: list[str]) -> int:
    """Command line: ``anima-ft export RUN_OR_CHECKPOINT OUT.safetensors [--tag step_00001000]``."""
    parser = argparse.ArgumentParser(prog="anima-ft export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory, its checkpoints/ directory, or one step_* checkpoint")
    parser.add_argument("out", type=Path, help="output .safetensors (official `net.` layout, bf16)")
    parser.add_argument("--tag", default=None, help="checkpoint name (step_XXXXXXXX); default: latest")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (a run with ema.decay > 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ckpt = resolve_checkpoint(args.source, args.tag)
        export_checkpoint(ckpt, args.out, ema=args.ema)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    return 0
