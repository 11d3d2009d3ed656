"""``anima-ft export RUN_OR_CHECKPOINT OUT.safetensors``: ZeRO shards -> one bf16 file in the official layout.

The fp32 master weights are reassembled on the CPU from the ZeRO-1/2/3 shard files with DeepSpeed's
``zero_to_fp32`` reader (trainable parameters from the optimizer shards, frozen ones from the model-state files),
so no GPU ever holds the full model. The result is written one tensor at a time (``save_anima_streamed``): ``net.`` keys,
adapter included, bf16, with the model config and the resolved training config in the metadata. ``--ema`` writes
the EMA of the weights instead, as its own file.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from anima_ft.command_errors import reports_input_errors

from .checkpoint import DAMAGED_FIX, read_text_checked, read_trainer_state

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
            ckpt = root / read_text_checked(root / "latest").strip()
            if (ckpt / "trainer.json").is_file():
                return ckpt
    what = f"checkpoint {tag!r}" if tag else "complete checkpoint (trainer.json) or 'latest' file"
    raise ValueError(f"{path}: found no {what}; pass a run directory, its checkpoints/ directory or a step_* directory")


_SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")


def _check_archive(path: Path) -> None:
    """A ``torch.save`` file is a zip archive whose directory sits at its end: a truncated one has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({exc}); the checkpoint is damaged: export another "
                         "step_* directory (--tag)") from exc


def check_shard_files(ckpt: Path, world_size: int | None) -> None:
    """Every DeepSpeed shard of ``ckpt`` is present and complete, before DeepSpeed's reader opens any of them.

    Needs one ``*_optim_states.pt`` per saving rank (``world_size`` from trainer.json), and the model states: one
    ``mp_rank_00_model_states.pt`` (ZeRO-1/2) or one ``zero_pp_rank_R_..._model_states.pt`` per rank (ZeRO-3).
    A missing file is a FileNotFoundError naming it; a truncated one (no zip directory) a ValueError naming it.
    """
    optim = sorted(ckpt.glob("*_optim_states.pt"))
    if not optim:
        raise FileNotFoundError(f"{ckpt} holds no *_optim_states.pt shard files; the checkpoint is incomplete")
    per_rank_model = sorted(f for f in ckpt.glob("*_model_states.pt") if _SHARD_RANK.search(f.name))
    model = [ckpt / "mp_rank_00_model_states.pt"] if not per_rank_model else per_rank_model
    if world_size is not None:
        for files, kind in ((optim, "optim"), (per_rank_model, "model")):
            matches = [m for f in files if (m := _SHARD_RANK.search(f.name))]
            if not matches:
                continue
            prefix = files[0].name[: matches[0].start()]  # e.g. "bf16_" for DeepSpeed's bf16 optimizer
            lost = sorted(set(range(world_size)) - {int(m.group(1)) for m in matches})
            if lost:
                names = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in lost]
                raise FileNotFoundError(f"{ckpt} lacks {', '.join(names)} (saved by {world_size} ranks); the "
                                        "checkpoint is incomplete: export another step_* directory (--tag)")
    if not model[0].is_file():
        raise FileNotFoundError(f"{model[0]} is missing (a ZeRO-3 checkpoint has zero_pp_rank_R_mp_rank_00_model_states"
                                ".pt per rank instead); the checkpoint is incomplete: export another step_* directory")
    for path in (*optim, *model):
        _check_archive(path)


def fp32_state_dict(ckpt: Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 ``{name: tensor}`` (internal names, no ``net.``) assembled on CPU from the ZeRO shards.

    ``lazy``: ZeRO-3 parameters stay DeepSpeed ``GatheredTensor`` views over the (memory-mapped) shards until
    ``.contiguous()`` is called on each, so an export holds one full tensor at a time instead of every one.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=lazy)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        # ZeRO-1 checkpoints carry no frozen-parameter fragments; frozen weights are exact in the module state instead
        # (read only then, memory-mapped: at full size the module state is 4.2 GB)
        model_states = ckpt / "mp_rank_00_model_states.pt"
        if model_states.is_file():
            module = torch.load(model_states, map_location="cpu", weights_only=False, mmap=True)["module"]
            for name, tensor in module.items():
                name = name.removeprefix("module.")
                if name not in sd and tensor.numel() > 0:
                    sd[name] = tensor if lazy else tensor.float()
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        # torch.load reports a damaged archive as RuntimeError; DeepSpeed's reader a missing entry as KeyError
        raise ValueError(f"{ckpt}: the ZeRO shards cannot be read ({type(exc).__name__}: {exc}); the checkpoint is "
                         "damaged: export another step_* directory (--tag)") from exc
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
    from anima_ft.model import AnimaConfig
    from anima_ft.model.config import check_layout
    from anima_ft.model.state_dict import dtype_name
    from anima_ft.model.streamed_file import save_anima_streamed

    state = read_trainer_state(ckpt)
    path = ckpt / "trainer.json"
    if not isinstance(state.get("model_config"), dict) or "step" not in state:
        raise ValueError(f"{path} has no model_config object or step; it was not written by anima_ft's trainer, or "
                         f"{DAMAGED_FIX}")
    if not isinstance(state.get("train_config", ""), str):
        raise ValueError(f"{path}: 'train_config' must be the resolved config as a YAML string; {DAMAGED_FIX}")
    try:
        cfg = AnimaConfig.from_dict(state["model_config"])
        cfg.validate()
    except ValueError as exc:
        raise ValueError(f"{ckpt / 'trainer.json'}: model_config is invalid ({exc})") from exc
    world_size = state.get("world_size")
    check_shard_files(ckpt, world_size if isinstance(world_size, int) and world_size > 0 else None)
    meta = {"anima_ft.step": str(state["step"]), "anima_ft.samples_seen": str(state["samples_seen"]),
            "anima_ft.weights": "ema" if ema else "trained"}
    if "train_config" in state:
        meta["anima_ft.train_config"] = state["train_config"]
    with tempfile.TemporaryDirectory() as tmp:
        sd = fp32_state_dict(ema_view(ckpt, Path(tmp)) if ema else ckpt, lazy=True)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        dtypes = {k: dtype_name(v.dtype) for k, v in sd.items()}
        report = check_layout(cfg, shapes, dtypes)
        if report:
            raise ValueError(f"{ckpt}: the shard tensors do not match trainer.json's model_config: {report.message()}")
        # one tensor at a time, cast to bf16 as it is written (a whole-model fp32 dict plus a bf16 copy peaked at
        # about 3x the file size at full size; docs/full_size_cpu.md)
        save_anima_streamed(cfg, sd, out, metadata=meta)
    logger.info("exported %s (step %d) to %s", ckpt, state["step"], out)
    return Path(out)


@reports_input_errors("anima-ft export")
def main(argv: list[str]) -> int:
    """Command line: ``anima-ft export RUN_OR_CHECKPOINT OUT.safetensors [--tag step_00001000]``.

    Exit 0 on success; 2 with one line on stderr for a missing or damaged checkpoint (the line names the file).
    """
    parser = argparse.ArgumentParser(prog="anima-ft export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory, its checkpoints/ directory, or one step_* checkpoint")
    parser.add_argument("out", type=Path, help="output .safetensors (official `net.` layout, bf16)")
    parser.add_argument("--tag", default=None, help="checkpoint name (step_XXXXXXXX); default: latest")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (a run with ema.decay > 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export_checkpoint(resolve_checkpoint(args.source, args.tag), args.out, ema=args.ema)
    return 0
