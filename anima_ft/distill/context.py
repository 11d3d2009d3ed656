"""Adapter sources: where the student's cross-attention context comes from on distill samples.

Shape legend: B batch, N context tokens (max(L, 512)), C context width, L T5 length.

* ``own``      ctx_S = A_S(c)                      the student's own (trainable) adapter
* ``frozen``   ctx_S = A_T(c)                      the teacher's adapter output (no gradient)
* ``reinit``   ctx_S = A'(c)                       A' = fresh adapter (seeded) put in place of A_S for the whole run
* ``small``    ctx_S = A''(c)                      A'' = fresh adapter with fewer layers / narrower MLP, in place of A_S
* ``dropout``  ctx_S[b, n] = m[b, n] * base[b, n]  m ~ Bernoulli(1 - p) on valid rows (n < L_b), no rescaling:
                                                   a dropped token looks like padding, which the DiT already knows
* ``noise``    ctx_S[b, n] = base[b, n] + s z      z ~ N(0, I) on valid rows only (the zero padding stays zero)

``base`` is ``own`` or ``frozen`` (``perturb_base``). ``reinit``/``small`` change the student module before the
DeepSpeed engine is built (:func:`prepare_student`), so ZeRO partitions the new adapter and the ``llm_adapter`` LR
group decides whether it trains. The others act per micro-batch through a forward hook on the student's
``llm_adapter`` (:class:`ContextOverride`), so the student still runs through the engine's ``forward`` (which
DeepSpeed needs for its backward bookkeeping) and flow samples keep the unmodified context.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from anima_ft.config.distill import DistillConfig
from anima_ft.model import AdapterConfig, LLMAdapter

logger = logging.getLogger(__name__)


def core_module(model: nn.Module) -> nn.Module:
    """The bare Anima module behind a DeepSpeed engine (``.module``) or the module itself."""
    return getattr(model, "module", model)


def small_adapter_config(base: AdapterConfig, num_layers: int, mlp_hidden: int = 0, num_heads: int = 0) -> AdapterConfig:
    """``base`` with fewer layers / a narrower MLP / other head count; the width (= context width) is kept."""
    cfg = dataclasses.replace(base, num_layers=num_layers, mlp_hidden=mlp_hidden or base.mlp_hidden,
                              num_heads=num_heads or base.num_heads)
    if cfg.model_dim % cfg.num_heads or cfg.head_dim % 2:
        raise ValueError(f"small adapter: num_heads={cfg.num_heads} must divide the width {cfg.model_dim} into an "
                         "even head dim; change distill.small_num_heads")
    return cfg


def fresh_adapter(cfg: AdapterConfig, seed: int, like: nn.Module) -> LLMAdapter:
    """A newly initialized adapter (the model's own init, seeded) on ``like``'s device and dtype.

    The global RNG is forked, so building it does not change any other draw of the run.
    """
    ref = next(like.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(ref.device):
            adapter = LLMAdapter(cfg)
    return adapter.to(ref.dtype)


def prepare_student(model: nn.Module, cfg: DistillConfig) -> str:
    """Apply a module-level adapter source (``reinit``/``small``) to ``model`` in place; returns a description.

    Must run before ``deepspeed.initialize`` (the engine must see, and ZeRO-3 partition, the new adapter). Other
    sources leave the model untouched.
    """
    if cfg.adapter_source not in ("reinit", "small"):
        return f"student adapter: own ({cfg.adapter_source} context on distill samples)"
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        raise ValueError("prepare_student: the model is already ZeRO-3 partitioned; call it before deepspeed.initialize")
    if model.llm_adapter is None:
        raise ValueError("distill.adapter_source needs a model with an LLM adapter; this one has none")
    acfg = model.cfg.adapter
    if cfg.adapter_source == "small":
        acfg = small_adapter_config(acfg, cfg.small_num_layers, cfg.small_mlp_hidden, cfg.small_num_heads)
    model.llm_adapter = fresh_adapter(acfg, cfg.reinit_seed, model.llm_adapter)
    model.cfg = dataclasses.replace(model.cfg, adapter=acfg)
    desc = (f"student adapter: {cfg.adapter_source} (seed {cfg.reinit_seed}, {acfg.num_layers} layers, "
            f"mlp {acfg.mlp_hidden}, {acfg.num_heads} heads)")
    logger.info(desc)
    return desc


def valid_rows(t5_mask_B_L: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool [B, N]: context rows that carry a token (n < L and t5_mask); the padding to N rows is False."""
    B, L = t5_mask_B_L.shape
    rows = torch.zeros(B, num_tokens, dtype=torch.bool, device=t5_mask_B_L.device)
    rows[:, :min(L, num_tokens)] = t5_mask_B_L[:, :num_tokens].bool()
    return rows


def drop_rows(ctx_B_N_C: torch.Tensor, rows_B_N: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each valid row with probability ``p`` (draw ``u ~ U[0,1)`` per row on the CPU generator; drop if u < p)."""
    u = torch.rand(rows_B_N.shape, generator=generator).to(ctx_B_N_C.device)
    keep = ~(rows_B_N & (u < p))
    return ctx_B_N_C * keep[..., None].to(ctx_B_N_C.dtype)


def noise_rows(ctx_B_N_C: torch.Tensor, rows_B_N: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add ``std * z`` (z ~ N(0, I), CPU generator) to the valid rows; padding rows stay exactly zero."""
    z = torch.randn(ctx_B_N_C.shape, generator=generator, dtype=torch.float32).to(ctx_B_N_C.device)
    return ctx_B_N_C + (std * z * rows_B_N[..., None]).to(ctx_B_N_C.dtype)


class ContextOverride:
    """Context manager: while active, the student's adapter output ``ctx`` is replaced by ``fn(ctx)``.

    Implemented as a forward hook on ``llm_adapter`` so the student still runs through its (engine) ``forward``.
    """

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor] | None):
        self.adapter = core_module(model).llm_adapter
        self.fn = fn
        self.handle = None

    def __enter__(self) -> ContextOverride:
        if self.fn is not None:
            self.handle = self.adapter.register_forward_hook(lambda _m, _inp, out: self.fn(out))
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def student_context_fn(source: str, distill_B: torch.Tensor, t5_mask_B_L: torch.Tensor,
                       teacher_ctx_B_N_C: torch.Tensor | None, cfg: DistillConfig,
                       generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The hook function mapping the student's own context to its context under ``source`` (None = unchanged).

    Only rows ``b`` with ``distill_B[b]`` change; flow samples keep the student's own context. Random draws (dropout
    mask, noise) are made for the whole batch so the generator's consumption does not depend on the batch's mix.
    """
    if source in ("own", "reinit", "small"):
        return None
    base_frozen = source == "frozen" or cfg.perturb_base == "frozen"
    if base_frozen and teacher_ctx_B_N_C is None:
        raise ValueError(f"adapter source {source!r} (perturb_base={cfg.perturb_base!r}) needs the live teacher's "
                         "context; set distill.teacher=live")

    def fn(own_B_N_C: torch.Tensor) -> torch.Tensor:
        base = teacher_ctx_B_N_C.to(own_B_N_C.dtype) if base_frozen else own_B_N_C
        rows = valid_rows(t5_mask_B_L.to(own_B_N_C.device), own_B_N_C.shape[1])
        if source == "dropout":
            base = drop_rows(base, rows, cfg.context_dropout, generator)
        elif source == "noise":
            base = noise_rows(base, rows, cfg.context_noise_std, generator)
        pick = distill_B.to(own_B_N_C.device)[:, None, None]
        return torch.where(pick, base, own_B_N_C)

    return fn
