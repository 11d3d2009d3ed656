"""The teacher: a frozen copy of the starting model (DiT + adapter), in eval mode, without gradients.

Two placements (costs in the package README section):

* replicated: every rank holds the whole teacher in the training dtype (2 bytes x 2.0e9 params = 4 GB in bf16);
* ZeRO-3: ``deepspeed.initialize`` with no optimizer partitions the teacher's parameters over the data-parallel ranks
  (4 GB / world size per rank, no gradients, no optimizer state); each forward all-gathers the parameters block by
  block, like the student under ZeRO-3. Its forward is a collective, so every rank must run it the same number of
  times: :attr:`Teacher.collective` tells the objective to run it on every micro-batch, distill samples or not.

``Teacher.__call__`` returns the velocity and the adapter's context of the same forward (the context is captured by
a forward hook on ``llm_adapter``, so the teacher also runs through the engine's ``forward`` under ZeRO-3).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .context import core_module

logger = logging.getLogger(__name__)


@dataclass
class TeacherOutput:
    """``velocity`` [B, 16, T, H, W] and ``context`` [B, N, C] of one teacher forward (no autograd graph)."""

    velocity: torch.Tensor
    context: torch.Tensor


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Teacher:
    """A frozen Anima (plain module or DeepSpeed ZeRO-3 inference engine) that returns velocity and context."""

    def __init__(self, model: nn.Module, collective: bool = False):
        self.model = model
        self.collective = collective
        freeze(core_module(model))

    @classmethod
    def from_model(cls, student: nn.Module) -> Teacher:
        """A deep copy of ``student`` as it is now (call before training and before ``deepspeed.initialize``)."""
        core = core_module(student)
        if any(hasattr(p, "ds_tensor") for p in core.parameters()):
            raise ValueError("Teacher.from_model: the student is ZeRO-3 partitioned; copy it before deepspeed."
                             "initialize or load the teacher from the init checkpoint (load_teacher)")
        return cls(copy.deepcopy(core))

    @property
    def module(self) -> nn.Module:
        """The bare Anima module."""
        return core_module(self.model)

    def param_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """Dtype and device of the teacher's parameters (also for ZeRO-3 partitioned ones)."""
        p = next(self.module.parameters())
        return p.dtype, p.device

    @torch.no_grad()
    def __call__(self, x_t, t, qwen_states, qwen_mask, t5_ids, t5_mask) -> TeacherOutput:
        """Velocity and context for ``x_t`` [B,16,1,H,W] at ``t`` [B] with the given caption tensors."""
        dtype, device = self.param_dtype_device()
        captured: list[torch.Tensor] = []
        handle = self.module.llm_adapter.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            v = self.model(x_t.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype),
                           qwen_states.to(device=device, dtype=dtype), qwen_mask.to(device),
                           t5_ids.to(device), t5_mask.to(device))
        finally:
            handle.remove()
        return TeacherOutput(v, captured[0])


def load_teacher(path: str, adapter_path: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, attention_backend: str = "sdpa") -> nn.Module:
    """The frozen teacher module from an official checkpoint (``load_anima``), in eval mode, no gradients."""
    from anima_ft.model import load_anima

    model = load_anima(path, adapter_path=adapter_path, device=device, dtype=dtype)
    model.set_attention_backend(attention_backend)
    return freeze(model)


def teacher_deepspeed_config(student_ds_config: dict, persistence_threshold: int | None = None) -> dict:
    """DeepSpeed JSON for the teacher: the student's batch and precision keys, ZeRO-3, no optimizer sections.

    ``persistence_threshold``: parameters with fewer elements stay whole on every rank (DeepSpeed's
    ``stage3_param_persistence_threshold``); None keeps the student's value (or DeepSpeed's default).
    """
    ds = copy.deepcopy(student_ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer",
                "zero_force_ds_cpu_optimizer"):
        ds.pop(key, None)
    zero = dict(ds.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(persistence_threshold)
    ds["zero_optimization"] = zero
    return ds


def partition_teacher(module: nn.Module, student_ds_config: dict, persistence_threshold: int | None = None) -> Teacher:
    """Wrap the frozen ``module`` in a ZeRO-3 DeepSpeed engine without optimizer (parameters partitioned).

    Needs an initialized process group (``deepspeed.init_distributed`` / the trainer's). Every rank must call the
    returned teacher on every micro-batch (``collective=True``).
    """
    import deepspeed

    freeze(module)
    ds = teacher_deepspeed_config(student_ds_config, persistence_threshold)
    engine, *_ = deepspeed.initialize(model=module, config=ds, dist_init_required=False)
    engine.eval()
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
    local = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    logger.info("teacher partitioned with ZeRO-3: %d of %d elements held on this rank", local, full)
    return Teacher(engine, collective=True)
