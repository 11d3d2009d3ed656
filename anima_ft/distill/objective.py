"""The distillation objective: flow matching on some sources, matching a frozen teacher on others, one backward.

Per micro-batch, with ``x_t = (1 - t) x_0 + t eps`` (noise and t drawn exactly as ``compute_loss`` draws them) and the
sample's source s_b mapped to a kind and a weight w_b by ``distill.losses``::

    flow:     l_b = mean_{c,h,w} (v_S(x_t, t, ctx_own) - (eps - x_0))^2
    distill:  l_b = mean_{c,h,w} (v_S(x_t, t, ctx_src) - v_T(x_t, t, ctx_T))^2          (same x_t, t, caption)
    loss      = 1/B sum_b w_b l_b                    per_sample = w_b l_b (float32, detached, for per-source metrics)

``ctx_src`` is the adapter source of the current stage (``context.py``). With the precomputed teacher, the distill
rows take their (t, eps) from the store's K fixed draws (draw k ~ U{0..K-1} from the same generator) and v_T from disk.
The student runs once per micro-batch through ``model(...)`` (the engine's forward, as DeepSpeed requires); its
context is swapped on the distill rows by a forward hook. Losses are computed in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from anima_ft.config.distill import DistillConfig, SourceLoss, stage_settings
from anima_ft.config.schema import ObjectiveConfig
from anima_ft.diffusion import LossOutput, draw_noise_and_timesteps, flow_matching_loss, interpolate, velocity_target

from .context import ContextOverride, student_context_fn
from .precompute import VelocityStore
from .teacher import Teacher

logger = logging.getLogger(__name__)
CONDITION_KEYS = ("qwen_states", "qwen_mask", "t5_ids", "t5_mask")


@dataclass
class DistillLossOutput(LossOutput):
    """:class:`LossOutput` plus the unweighted terms: ``kind`` [B] (0 flow, 1 distill), ``raw`` [B] = l_b."""

    kind: torch.Tensor | None = None
    raw: torch.Tensor | None = None

    def term_means(self) -> dict[str, float]:
        """Mean unweighted flow and distill loss over this micro-batch's samples of each kind (absent = omitted)."""
        out = {}
        for i, name in enumerate(("flow", "distill")):
            sel = self.kind == i
            if sel.any():
                out[name] = float(self.raw[sel].mean())
        return out


class DistillObjective:
    """``objective(model, batch, generator) -> DistillLossOutput``: the loss hook of a run with
    ``distill.enabled`` (same signature as ``anima_ft.train.objective.FlowObjective``).

    teacher: a live :class:`Teacher` or a :class:`VelocityStore` (``distill.teacher=precomputed``).
    """

    def __init__(self, teacher: Teacher | VelocityStore | None, cfg: DistillConfig, objective_cfg: ObjectiveConfig,
                 num_stages: int = 1):
        self.teacher, self.cfg, self.objective_cfg = teacher, cfg, objective_cfg
        self._warned_dropout = False
        self.set_stage(0)

    def set_stage(self, index: int) -> None:
        """Switch the loss terms and the context source to those of training stage ``index``."""
        losses, self.adapter_source = stage_settings(self.cfg, index)
        self.terms: dict[str, SourceLoss] = {term.source: term for term in losses}
        needs_teacher = any(term.kind == "distill" and term.weight > 0 for term in losses)
        if needs_teacher and self.teacher is None:
            raise ValueError("distill.losses has a distill term but no teacher was given; build it with "
                             "Teacher.from_model / load_teacher or a VelocityStore")
        logger.info("distill stage %d: %s, adapter source %s", index,
                    ", ".join(f"{t.source}:{t.kind}x{t.weight:g}" for t in losses), self.adapter_source)

    def _row_terms(self, sources: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(is_distill bool [B], weight float32 [B])`` from each sample's source."""
        missing = sorted({s for s in sources if s not in self.terms})
        if missing:
            raise ValueError(f"batch has samples from source(s) {missing} that distill.losses does not list "
                             f"(listed: {sorted(self.terms)}); add a {{source, kind, weight}} entry for each")
        is_distill = torch.tensor([self.terms[s].kind == "distill" for s in sources], dtype=torch.bool)
        weight = torch.tensor([self.terms[s].weight for s in sources], dtype=torch.float32)
        return is_distill.to(device), weight.to(device)

    def __call__(self, model, batch: dict, generator: torch.Generator) -> DistillLossOutput:
        """Weighted flow + distillation loss of one batch-contract micro-batch (module docstring)."""
        param = next(p for p in model.parameters())
        device, dtype = param.device, param.dtype
        ocfg = self.objective_cfg
        x_0 = batch["latents"].to(device=device, dtype=torch.float32).unsqueeze(2)  # [B,16,1,h,w]
        B = x_0.shape[0]
        noise, t = draw_noise_and_timesteps(x_0, generator, sampling=ocfg.timestep_sampling,
                                            sigmoid_scale=ocfg.sigmoid_scale,
                                            shift=None if ocfg.shift == 1.0 else ocfg.shift)
        is_distill, weight = self._row_terms(list(batch["source"]), device)
        cond = [batch["qwen_states"].to(device=device, dtype=dtype)] + [batch[k].to(device) for k in CONDITION_KEYS[1:]]
        rows = is_distill.nonzero().flatten()
        v_teacher = torch.zeros_like(x_0)  # [B,16,1,h,w]; filled on distill rows
        teacher_ctx = None
        if isinstance(self.teacher, VelocityStore):
            noise, t = noise.clone(), t.clone()
            pick = torch.randint(self.teacher.num_draws, (B,), generator=generator)
            dropped = ~batch["qwen_mask"].bool().any(dim=1).to(device) & is_distill
            if dropped.any():  # the store holds velocities for the real caption, not the dropped (empty) one
                if not self._warned_dropout:
                    logger.warning("precomputed teacher: distill samples with a dropped (empty) caption get weight 0; "
                                   "set data.caption_dropout=0 for distill sources or use distill.teacher=live")
                    self._warned_dropout = True
                weight = weight * (~dropped).float()
                is_distill = is_distill & ~dropped
                rows = is_distill.nonzero().flatten()
            for b in rows.tolist():
                t_k, eps_k, v_k = self.teacher.get(batch["key"][b], int(pick[b]))
                t[b], noise[b, :, 0], v_teacher[b, :, 0] = t_k, eps_k.to(device), v_k.to(device)
        x_t = interpolate(x_0, noise, t)
        if isinstance(self.teacher, Teacher) and (len(rows) or self.teacher.collective):
            sel = torch.arange(B, device=device) if self.teacher.collective else rows
            out = self.teacher(x_t[sel], t[sel], *(c[sel] for c in cond))
            v_teacher[sel] = out.velocity.to(v_teacher.dtype)
            teacher_ctx = out.context.new_zeros(B, *out.context.shape[1:])
            teacher_ctx[sel] = out.context
        fn = None
        if len(rows):
            fn = student_context_fn(self.adapter_source, is_distill, batch["t5_mask"], teacher_ctx, self.cfg,
                                    generator)
        with ContextOverride(model, fn):
            pred = model(x_t.to(dtype), t.to(dtype), *cond)
        flow = flow_matching_loss(pred, velocity_target(x_0, noise), t, reduction="none")  # [B]
        match = (pred.float() - v_teacher.float()).pow(2).flatten(1).mean(dim=1)  # [B]
        raw = torch.where(is_distill, match, flow)
        per_sample = weight * raw
        return DistillLossOutput(per_sample.mean(), per_sample.detach(), is_distill.long(), raw.detach())
