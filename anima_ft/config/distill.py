"""The distillation config (``distill:`` of the training config): which sources get which loss, where the student's
context comes from, the teacher. ``anima_ft.distill`` implements it; the schema composes it from here, so the config
layer imports nothing above it. Weights are lists of small records rather than dicts so the OmegaConf struct-mode
loader can merge and override them. Field rules (ranges, choices) are checked by ``fields.check_fields``; the
cross-field rules by :func:`validate_distill`.

Example (YAML)::

    distill:
      enabled: true
      adapter_source: reinit        # the student's adapter is re-initialized: the DiT must carry the knowledge
      losses:
        - {source: target, kind: flow, weight: 1.0}
        - {source: replay, kind: distill, weight: 1.0}
      stages:                       # one entry per training stage (empty = the lists above in every stage)
        - {losses: [{source: replay, kind: distill, weight: 1.0}]}
        - {adapter_source: own}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .fields import bounded, check_fields, one_of, seed_field

ADAPTER_SOURCES = ("own", "frozen", "reinit", "small", "dropout", "noise")
"""Where the student's context comes from on distill samples (``DistillConfig.adapter_source``)."""
MODEL_ADAPTER_SOURCES = ("reinit", "small")
"""Sources that replace the student's adapter module itself (fixed for the whole run, applied before the engine)."""
PERTURB_BASES = ("own", "frozen")
LOSS_KINDS = ("flow", "distill")
TEACHER_MODES = ("live", "precomputed")


@dataclass
class SourceLoss:
    """One data source's loss term."""

    source: str = "target"
    """Data-source name as in ``batch["source"]`` (``data.sources[*].name``)."""
    kind: str = one_of("flow", LOSS_KINDS)
    """``flow`` (rectified-flow loss against eps - x_0) or ``distill`` (squared distance to the teacher's velocity)."""
    weight: float = bounded(1.0, 0)
    """Multiplier of this source's per-sample loss (0 = the samples are drawn but contribute nothing)."""


@dataclass
class DistillStage:
    """Per-stage overrides, aligned with the training ``stages`` list by index."""

    losses: list[SourceLoss] = field(default_factory=list)
    """Loss terms during this stage; empty = inherit ``distill.losses``."""
    adapter_source: str = ""
    """Context source during this stage; empty = inherit. ``reinit``/``small`` cannot change between stages."""


@dataclass
class DistillConfig:
    """Teacher-student redistribution of knowledge from the LLM adapter into the DiT."""

    enabled: bool = False
    """Use the distillation objective instead of the plain flow-matching ``compute_loss``."""
    losses: list[SourceLoss] = field(
        default_factory=lambda: [SourceLoss("target", "flow", 1.0), SourceLoss("replay", "distill", 1.0)]
    )
    """Loss term per data source; a source may appear once. A batch sample from an unlisted source is an error."""
    adapter_source: str = one_of("own", ADAPTER_SOURCES)
    """Student context on distill samples: ``own`` (its trainable adapter), ``frozen`` (the teacher's adapter output),
    ``reinit`` (the student's adapter re-initialized with ``reinit_seed``; trainable iff the llm_adapter LR > 0),
    ``small`` (a fresh adapter with ``small_num_layers`` / ``small_mlp_hidden`` / ``small_num_heads``), ``dropout``
    (context rows of ``perturb_base`` zeroed with prob ``context_dropout``), ``noise`` (N(0, context_noise_std^2) added
    to the valid rows of ``perturb_base``). ``reinit``/``small`` replace the student's adapter for every sample."""
    reinit_seed: int = seed_field(1234)
    """Seed of the re-initialized (``reinit``) or ``small`` adapter."""
    small_num_layers: int = bounded(1, 1)
    """Adapter blocks of the ``small`` adapter."""
    small_mlp_hidden: int = bounded(0, 0, note="0 = the original's")
    """MLP hidden width of the ``small`` adapter; 0 = the original's."""
    small_num_heads: int = bounded(0, 0, note="0 = the original's")
    """Attention heads of the ``small`` adapter; 0 = the original's (its width must stay the context width)."""
    context_dropout: float = bounded(0.1, 0, 1, hi_open=True)
    """``dropout``: probability of zeroing each valid context row (T5 token) of a distill sample."""
    context_noise_std: float = bounded(0.1, 0)
    """``noise``: std of the Gaussian noise added to each valid context row of a distill sample."""
    perturb_base: str = one_of("own", PERTURB_BASES)
    """Context that ``dropout``/``noise`` perturb: ``own`` (student adapter, gradients flow) or ``frozen`` (teacher)."""
    teacher: str = one_of("live", TEACHER_MODES)
    """``live`` (a frozen copy of the init model runs beside the student) or ``precomputed`` (velocities on disk)."""
    teacher_path: str = ""
    """Teacher checkpoint (official safetensors); empty = ``model.init_path`` (or a copy of the random init)."""
    teacher_zero3: bool = False
    """Partition the live teacher with ZeRO-3 (no optimizer state); otherwise every rank holds a full copy."""
    precomputed_dir: str = ""
    """``precomputed``: directory written by ``anima-ft distill precompute`` (index.json + velocity shards)."""
    stages: list[DistillStage] = field(default_factory=list)
    """Per-stage overrides; empty = the settings above in every stage, else one entry per training stage."""


def stage_settings(cfg: DistillConfig, stage_index: int) -> tuple[list[SourceLoss], str]:
    """``(losses, adapter_source)`` in force during training stage ``stage_index`` (inheritance resolved)."""
    if not cfg.stages:
        return list(cfg.losses), cfg.adapter_source
    if not 0 <= stage_index < len(cfg.stages):
        raise ValueError(f"distill.stages has {len(cfg.stages)} entries but stage {stage_index} was asked for; "
                         "give one entry per training stage")
    st = cfg.stages[stage_index]
    return list(st.losses or cfg.losses), st.adapter_source or cfg.adapter_source


def check_losses(losses: list[SourceLoss], where: str) -> None:
    """Raise ValueError for an empty source or a source listed twice (kind and weight: ``SourceLoss`` field rules)."""
    seen: set[str] = set()
    for i, term in enumerate(losses):
        if not term.source:
            raise ValueError(f"{where}.{i}.source is empty; name a data source (e.g. replay)")
        if term.source in seen:
            raise ValueError(f"{where}: source {term.source!r} is listed twice; give each source one loss kind")
        seen.add(term.source)


def validate_distill(cfg: DistillConfig, num_stages: int = 1) -> None:
    """Every field of :class:`DistillConfig` against its rule, then the cross-field checks (``num_stages`` = training
    stages, 1 when unstaged). ``anima_ft.config.validate`` calls it once when ``distill.enabled``."""
    check_fields(cfg, "distill")
    if cfg.teacher == "precomputed" and not cfg.precomputed_dir:
        raise ValueError("distill.teacher=precomputed needs distill.precomputed_dir (written by "
                         "`anima-ft distill precompute`)")
    check_losses(cfg.losses, "distill.losses")
    if cfg.stages and len(cfg.stages) != num_stages:
        raise ValueError(f"distill.stages has {len(cfg.stages)} entries but training has {num_stages} stage(s); "
                         "give one entry per stage or none")
    for i, st in enumerate(cfg.stages):
        check_losses(st.losses, f"distill.stages.{i}.losses")
        src = st.adapter_source
        if src and src not in ADAPTER_SOURCES:
            raise ValueError(f"distill.stages.{i}.adapter_source={src!r} is not valid; use one of "
                             f"{list(ADAPTER_SOURCES)} or '' (inherit)")
        if src and (src in MODEL_ADAPTER_SOURCES or cfg.adapter_source in MODEL_ADAPTER_SOURCES) \
                and src != cfg.adapter_source:
            raise ValueError(f"distill.stages.{i}.adapter_source={src!r}: reinit/small replace the adapter module for "
                             f"the whole run (distill.adapter_source={cfg.adapter_source!r}); use the same value or ''")
    if cfg.teacher == "precomputed":
        for i in range(max(1, num_stages)):
            _, src = stage_settings(cfg, i) if cfg.stages else (None, cfg.adapter_source)
            if src == "frozen" or (src in ("dropout", "noise") and cfg.perturb_base == "frozen"):
                raise ValueError(f"adapter source {src!r} (perturb_base={cfg.perturb_base!r}) needs the teacher's "
                                 "context, which precomputed velocities do not store; use distill.teacher=live")
