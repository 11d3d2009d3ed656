"""Resume a checkpoint on another data-parallel world size (a Slurm requeue on a different number of GPUs or nodes).

ZeRO keeps the fp32 master weights and the Adam state as one flat partition per rank, so W ranks cannot read the
shards of W' != W ranks. On a world-size change the trainer goes through DeepSpeed's universal checkpoint format:

1. **Convert once** (:func:`prepare_universal`, collective): global rank 0 runs DeepSpeed's ``ds_to_universal``
   on ``step_N`` into ``step_N/universal.tmp`` and renames it to ``step_N/universal`` when complete; the other ranks
   wait (up to ``CONVERT_WAIT``) and a failure on rank 0 is raised on every rank. A later resume reuses the folder.
   ``universal/zero/<param>/`` holds the full fp32 weight, ``exp_avg`` and ``exp_avg_sq`` (and, for ZeRO-1/2,
   Adam's ``step``). DeepSpeed 0.19.8's converter leaves out what this module adds:
   - the EMA (``ema.pt``): the same converter run on a view of the checkpoint whose master partitions are the EMA;
   - under ZeRO-3, frozen parameters (``fp32.pt``, read with DeepSpeed's ``zero_to_fp32``) and each param group's
     AdamW step count (``anima_ft.json``; ZeRO-3 groups that became trainable at a stage boundary have fewer steps).
2. **Load** (:func:`load_universal`):
   - ZeRO-1/2: DeepSpeed's universal loader (engine built with ``"checkpoint": {"load_universal": true}``, see
     :func:`engine_config`). It restores weights, moments, EMA, per-group step counts and param-group settings.
   - ZeRO-3: per parameter with ``engine.set_full_state`` (DeepSpeed's ``safe_set_full_*`` semantics, as at a
     stage transition), after creating the AdamW state with each group's step count. DeepSpeed 0.19.8's ZeRO-3
     universal loader is wrong for an optimizer with several param groups: it copies the first group's settings
     (weight decay, LR, our ``name``/``group`` keys) into every group and gives all groups one shared ``step``
     tensor, which AdamW then increments once per group and optimizer step.
   - Both: the universal loaders skip the module state, so frozen parameters (no optimizer state) are copied from
     their ``fp32.pt``; under ZeRO-3 the module weights of trainable parameters are refreshed from the fp32 masters
     too (the setters only write the masters).

Everything restored is bitwise what was saved (fp32 values are moved, never recomputed). What cannot map 1:1 (the
per-rank RNG states and the data position) is handled by the trainer; see the README section on resuming.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from .engine import ADAM_KEYS, EMA_KEY, base_optimizer, materialize_state, set_full_state
from .export import state_view
from .param_groups import group_of

logger = logging.getLogger(__name__)
UNIVERSAL = "universal"
INFO_FILE = "anima_ft.json"
CONVERT_WAIT = datetime.timedelta(hours=4)  # how long the other ranks wait for rank 0's conversion


def engine_config(ds_config: dict) -> dict:
    """The DeepSpeed config for the engine that loads a universal checkpoint (ZeRO-1/2: DeepSpeed's own loader)."""
    out = copy.deepcopy(ds_config)
    if out["zero_optimization"]["stage"] < 3:
        out.setdefault("checkpoint", {})["load_universal"] = True
    return out


def _ds_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's converter, in this process (one worker: no fork of a process holding CUDA / process groups)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):  # prints and tqdm bars
            ds_to_universal(args)
    except Exception:
        logger.error("ds_to_universal %s failed; its output:\n%s", src, captured.getvalue()[-4000:])
        raise
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer file, unused here


def _read(path: Path) -> torch.Tensor:
    """A universal-checkpoint tensor file (ZeRO-1/2 write ``{"param": tensor, ...}``, ZeRO-3 the bare tensor)."""
    value = torch.load(path, map_location="cpu", weights_only=False)
    return value["param"] if isinstance(value, dict) else value


def convert_to_universal(ckpt: Path, param_names: list[str], ema: bool) -> Path:
    """Write ``ckpt/universal`` (see the module docstring); one process, no collectives. Returns the folder."""
    final, staging = ckpt / UNIVERSAL, ckpt / (UNIVERSAL + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that died
    _ds_to_universal(ckpt, staging)
    zero = staging / "zero"
    trainable = [n for n in param_names if (zero / n / "exp_avg.pt").is_file()]
    if ema:
        with tempfile.TemporaryDirectory(dir=ckpt.parent, prefix=".ema_view_") as tmp:
            _ds_to_universal(state_view(ckpt, Path(tmp), EMA_KEY), Path(tmp) / UNIVERSAL)
            for name in trainable:
                shutil.move(Path(tmp) / UNIVERSAL / "zero" / name / "fp32.pt", zero / name / f"{EMA_KEY}.pt")
    missing = [n for n in param_names if not (zero / n / "fp32.pt").is_file()]
    if missing:  # ZeRO-3: the converter skips frozen parameters
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
        lazy = {k.removeprefix("module."): v for k, v in lazy.items()}
        for name in missing:
            if name not in lazy:
                raise RuntimeError(f"{ckpt} holds no value for parameter {name!r}")
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save(lazy[name].contiguous().float(), zero / name / "fp32.pt")
    info = {"ema": ema, "group_steps": _saved_group_steps(zero)}
    (staging / INFO_FILE).write_text(json.dumps(info, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _saved_group_steps(zero: Path) -> dict[str, float]:
    """AdamW step count per param-group name, from the converter's ``optimizer_state.pt`` (ZeRO-3 layout: the
    base optimizer's state per sub-group, whose ``params`` index it); empty for ZeRO-1/2, which keep a ``step.pt``
    per parameter that DeepSpeed's loader reads."""
    osd = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    base = osd.get("optimizer_state_dict")
    if not isinstance(base, dict) or "state" not in base:
        return {}
    return {g["name"]: float(base["state"][g["params"][0]]["step"]) for g in base["param_groups"] if g["params"]}


def prepare_universal(ckpt: Path, param_names: list[str], ema: bool) -> Path:
    """Collective: make sure ``ckpt/universal`` exists (rank 0 converts while the others wait); returns it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = ckpt / UNIVERSAL
    # a gloo group with a long timeout to wait on: the conversion may outlast the training process group's timeout
    group = dist.new_group(backend="gloo", timeout=CONVERT_WAIT) if world > 1 else None
    error = None
    if rank == 0:
        if final.is_dir() and (json.loads((final / INFO_FILE).read_text())["ema"] or not ema):
            logger.info("reusing the universal checkpoint %s", final)
        else:
            logger.info("converting %s to a universal checkpoint in %s (DeepSpeed ds_to_universal, rank 0)", ckpt,
                        final)
            try:
                started = time.monotonic()
                convert_to_universal(ckpt, param_names, ema)
                logger.info("converted %s to a universal checkpoint in %.1f s", ckpt, time.monotonic() - started)
            except Exception as exc:  # re-raised below on every rank
                logger.exception("universal conversion failed")
                error = f"{type(exc).__name__}: {exc}"
    if group is not None:
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        error = box[0]
        dist.destroy_process_group(group)
    if error is not None:
        raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed on rank 0 ({error}); remove "
                           f"{ckpt / (UNIVERSAL + '.tmp')} and resume on the saved world size if it persists")
    return final


def load_universal(engine, model: nn.Module, ckpt: Path, ema: bool) -> None:
    """Load ``ckpt/universal`` (from :func:`prepare_universal` with the same ``ema``) into ``engine``, built for the
    checkpoint's stage (collective). See the module docstring."""
    folder = ckpt / UNIVERSAL
    info = json.loads((folder / INFO_FILE).read_text())
    zero3 = engine.zero_optimization_stage() == 3
    keys = (*ADAM_KEYS, EMA_KEY) if ema else ADAM_KEYS
    params = dict(model.named_parameters())
    saved = {n for n in params if (folder / "zero" / n / "exp_avg.pt").is_file()}
    now = {n for n, p in params.items() if p.requires_grad}
    if saved != now:
        differ = sorted({group_of(n) for n in saved ^ now})
        raise ValueError(f"{ckpt} was saved with another trainable set (groups {differ} differ) than this config's "
                         "stage at that step; resume with the learning rates of the saved run")
    groups = [g["name"] for g in base_optimizer(engine).param_groups]
    if not zero3:
        loaded, _ = engine.load_checkpoint(str(ckpt), tag=UNIVERSAL, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {folder}")
        # the loader pairs saved and current param groups by position: they must be the same groups
        assert [g["name"] for g in base_optimizer(engine).param_groups] == groups, "param groups reordered"
    else:
        if set(groups) - set(info["group_steps"]):
            raise RuntimeError(f"{folder / INFO_FILE} lacks the step counts of groups "
                               f"{sorted(set(groups) - set(info['group_steps']))}")
        materialize_state(engine, info["group_steps"], ema=ema)
    for name, p in params.items():
        value = _read(folder / "zero" / name / "fp32.pt")
        if zero3 and p.requires_grad:
            set_full_state(p, value)
            for key in keys:
                set_full_state(p, _read(folder / "zero" / name / f"{key}.pt"), key)
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(value.view(p.shape))
        elif not p.requires_grad:  # trainable ones were set from the fp32 masters by DeepSpeed's loader
            p.data.copy_(value.view(p.shape))
