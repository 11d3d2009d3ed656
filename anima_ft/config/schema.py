"""The training config schema: one dataclass per component, a docstring per field.

Sentinels are spelled out in each field's docstring ("0 = off", "-1 = inherit"). The loader (``loader.py``) merges
defaults < YAML < command-line dotlist in OmegaConf struct mode; ``validate.py`` holds the cross-field checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .distill import DistillConfig
from .fields import SEED_MAX, bounded, one_of, seed_field
from .remote import RemoteConfig

PARAM_GROUPS = ("base", "self_attn", "cross_attn", "mlp", "mod", "llm_adapter")
ATTENTION_BACKENDS = ("sdpa", "reference", "triton")
"""``model.attention_backend`` values (``anima_ft.model.layers`` dispatches on them)."""
MODEL_SIZES = ("full", "tiny")
ZERO_STAGES = (1, 2, 3)
PRECISIONS = ("bf16", "fp32")
PG_BACKENDS = ("auto", "nccl", "gloo")
DECAYS = ("constant", "cosine", "linear")
SAMPLERS = ("logit_normal", "uniform")
WANDB_MODES = ("online", "offline", "disabled")
BUDGET_ACTIONS = ("stop", "lower_lr", "mark_best")


def _lr(default: float):
    return bounded(default, 0, sentinels=(-1.0,), note="-1 = inherit optim.lr, stages only")


@dataclass
class GroupLRs:
    """Learning rate per parameter group (the groups users know from diffusion-pipe / sd-scripts).

    0 freezes a group (no gradients, no optimizer state). Inside a stage, -1 means "inherit ``optim.lr``".
    """

    base: float = _lr(1e-5)
    """Embeddings, timestep MLP, final layer and anything not matched by another group."""
    self_attn: float = _lr(1e-5)
    """``blocks.*.self_attn.*``."""
    cross_attn: float = _lr(1e-5)
    """``blocks.*.cross_attn.*``."""
    mlp: float = _lr(1e-5)
    """``blocks.*.mlp.*``."""
    mod: float = _lr(1e-5)
    """adaLN modulation: ``blocks.*.adaln_modulation_*`` and ``final_layer.adaln_modulation``."""
    llm_adapter: float = _lr(1e-5)
    """``llm_adapter.*`` (the 6-layer T5/Qwen adapter)."""


def _inherit_lrs() -> GroupLRs:
    return GroupLRs(**{g: -1.0 for g in PARAM_GROUPS})


@dataclass
class RunConfig:
    """Where the run lives and how it is seeded."""

    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints/ and exports go here."""
    name: str = ""
    """Human name of the run (wandb display name); empty = the run directory's base name."""
    seed: int = seed_field(0)
    """Global seed: model init, noise, timesteps and data order all derive from it."""
    deterministic: bool = False
    """Force deterministic torch algorithms (bitwise-reproducible resume on CPU; slower on GPU)."""


@dataclass
class ModelConfig:
    """Which weights to start from."""

    init_path: str = ""
    """Official Anima safetensors file to fine-tune; empty = random init of ``size`` (tests, smoke runs)."""
    adapter_path: str = ""
    """Separate LLM-adapter safetensors file; empty = the adapter is inside ``init_path``."""
    size: str = one_of("full", MODEL_SIZES)
    """Architecture for random init when ``init_path`` is empty: ``full`` (2B) or ``tiny`` (tests)."""
    attention_backend: str = one_of("sdpa", ATTENTION_BACKENDS)
    """Attention implementation: ``sdpa``, ``reference`` or ``triton``."""


@dataclass
class SourceConfig:
    """One pre-encoded shard source of the data mixture."""

    name: str = "target"
    """Source name; ``target`` and ``replay`` are the ones stages re-weight."""
    shards: list[str] = field(default_factory=list)
    """Shard paths or glob patterns (webdataset tar files written by ``anima-ft prepare``)."""
    weight: float = bounded(1.0, 0)
    """Sampling weight of this source relative to the others."""


@dataclass
class DataConfig:
    """The micro-batch stream."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Shard sources; empty = the built-in synthetic dataset (``synthetic_*`` fields), for tests only."""
    num_workers: int = bounded(2, 0)
    """Loader worker processes per rank (0 = load in the training process)."""
    caption_dropout: float = bounded(0.0, 0, 1)
    """Probability of replacing a caption by the empty-caption tensors (for CFG)."""
    expected_fingerprint: str = ""
    """Refuse shards whose encoder fingerprint differs; empty = accept any."""
    synthetic_num_samples: int = bounded(32, 1)
    """Synthetic dataset size (fixed samples, cycled), used only when ``sources`` is empty."""
    synthetic_latent_size: int = bounded(8, 2)
    """Synthetic latent height = width (pixels / 8)."""
    synthetic_num_tokens: int = bounded(8, 1)
    """Synthetic caption length in Qwen and T5 tokens."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    """Reading shards named by URL (s3://, gs://, https://): prefetch, retries, local shard cache
    (docs/data.md#shards-in-object-storage)."""


@dataclass
class BatchConfig:
    """Batch arithmetic: global = micro * grad_accum * data-parallel world size."""

    micro_batch_size: int = bounded(1, 1)
    """Samples per rank per forward/backward."""
    grad_accum_steps: int = bounded(1, 1)
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = bounded(0, 0)
    """Samples per optimizer step over all ranks; 0 = derived, otherwise must equal the product above."""


@dataclass
class OptimConfig:
    """AdamW and gradient handling."""

    lr: GroupLRs = field(default_factory=GroupLRs)
    """Peak learning rate per group (stages may override)."""
    weight_decay: float = bounded(0.01, 0)
    """Decoupled weight decay; norms, biases and embeddings get none."""
    betas: list[float] = bounded(lo=0, hi=1, hi_open=True, default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = bounded(1e-8, 0, lo_open=True)
    """AdamW epsilon (> 0: Adam divides by sqrt(v) + eps)."""
    grad_clip: float = bounded(1.0, 0, note="0 = off")
    """Clip the global gradient norm to this value; 0 = off."""
    max_nonfinite_in_row: int = bounded(5, 1)
    """A non-finite loss skips the step; this many in a row saves a checkpoint and stops with an error."""


@dataclass
class StageConfig:
    """One stage of a staged schedule."""

    name: str = ""
    """Label used in logs and metrics."""
    num_steps: int = bounded(0, 1)
    """Optimizer steps in this stage (must be > 0)."""
    lr: GroupLRs = field(default_factory=_inherit_lrs)
    """Peak LR per group; -1 = inherit ``optim.lr``; 0 = frozen during this stage."""
    warmup_steps: int = bounded(0, 0)
    """Linear warmup from 0 to the peak at the start of the stage."""
    decay: str = one_of("constant", DECAYS)
    """After warmup: ``constant``, ``cosine`` or ``linear`` down to ``min_lr_ratio`` * peak at the stage end."""
    min_lr_ratio: float = bounded(0.0, 0, 1)
    """Floor of the decay as a fraction of the peak LR."""
    replay_fraction: float = bounded(-1.0, 0, 1, sentinels=(-1.0,), note="-1 = keep source weights")
    """Share of samples drawn from the ``replay`` source (rest from ``target``); -1 = keep source weights."""


@dataclass
class DistConfig:
    """DeepSpeed and parallelism."""

    zero_stage: int = bounded(2, 1, 3)
    """ZeRO stage: 1, 2 or 3."""
    offload_optimizer: bool = False
    """Keep optimizer state (and the step) on the CPU (ZeRO-Offload)."""
    precision: str = one_of("bf16", PRECISIONS)
    """``bf16`` (mixed, fp32 master weights) or ``fp32``."""
    activation_checkpointing: float = bounded(0.0, 0, 1)
    """Share of DiT blocks recomputed in backward: 0 = none, 1 = all."""
    compile_blocks: bool = False
    """``torch.compile`` each DiT block."""
    backend: str = one_of("auto", PG_BACKENDS)
    """Process-group backend: ``auto`` (nccl on GPU, gloo on CPU), ``nccl`` or ``gloo``."""
    timeout_s: int = bounded(600, 1)
    """Collective timeout: a rank that dies makes the others fail within this many seconds."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: merged last into the generated DeepSpeed JSON (and logged)."""


@dataclass
class ObjectiveConfig:
    """The rectified-flow objective (docs/model.md#objective)."""

    timestep_sampling: str = one_of("logit_normal", SAMPLERS)
    """``logit_normal`` (t = sigmoid(scale * n)) or ``uniform``."""
    sigmoid_scale: float = bounded(1.0, 0, lo_open=True)
    """Scale of the logit-normal sampler."""
    shift: float = bounded(1.0, 0, lo_open=True)
    """Timestep shift t' = s t / (1 + (s - 1) t); 1 = none."""


@dataclass
class CheckpointConfig:
    """Sharded training-state checkpoints."""

    every_steps: int = bounded(0, 0, note="0 = off")
    """Save every N optimizer steps; 0 = off."""
    every_minutes: float = bounded(0.0, 0, note="0 = off")
    """Save when this many minutes passed since the last save; 0 = off."""
    keep_last: int = bounded(3, 0, note="0 = keep all")
    """Complete checkpoints kept, counting the newest; after each save older steps beyond that are deleted (by step
    number; never the one just written or the one ``latest`` names). 0 = keep all."""
    resume: str = "auto"
    """``auto`` (from ``latest`` in the run dir when present), ``none``, or a checkpoint directory. Resuming a
    checkpoint older than this run's newest moves the newer ones to ``checkpoints/rolled_back/`` (kept, with a
    warning); ``none`` moves all existing ones there. Requeues should use ``auto`` (docs/checkpointing.md#atomicity)."""
    save_at_end: bool = True
    """Save a checkpoint after the last step."""
    allow_world_size_change: bool = True
    """Resume a checkpoint saved by another number of ranks: converted once to a DeepSpeed universal checkpoint
    (``step_N/universal``, about the size of the optimizer shards), data position kept, RNGs reseeded
    (docs/checkpointing.md#world-size); false = refuse."""


@dataclass
class EmaConfig:
    """Exponential moving average of the trainable weights (kept sharded like the fp32 master weights)."""

    decay: float = bounded(0.0, 0, 1, hi_open=True, note="0 = off")
    """EMA_t = decay * EMA_(t-1) + (1 - decay) * W_t after every applied update; 0 = off."""


@dataclass
class LoggingConfig:
    """Metrics and progress."""

    every_steps: int = bounded(1, 1)
    """Write a metrics.jsonl line (and wandb) every N steps."""
    wandb_mode: str = one_of("disabled", WANDB_MODES)
    """``online``, ``offline`` or ``disabled``; the API key only from WANDB_API_KEY."""
    wandb_project: str = "anima_ft"
    """wandb project."""
    wandb_entity: str = ""
    """wandb entity; empty = the key's default."""
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0."""
    peak_tflops_per_device: float = bounded(989.0, 0, lo_open=True)
    """Dense bf16 peak used for the MFU estimate (H100 SXM = 989)."""


@dataclass
class EvalSetConfig:
    """One named probe eval set."""

    name: str = ""
    """Name used in the metrics (probe/<name>/sigma_<s>)."""
    path: str = ""
    """`anima-ft prepare` shard directory or glob."""


@dataclass
class EvalConfig:
    """In-training diagnostics (anima_ft.eval): forgetting probe, forgetting budget, weight drift, sample grids."""

    probe_every_steps: int = bounded(0, 0, note="0 = off")
    """Run the forgetting probe on eval.sets at step 0 and every N steps; 0 = off."""
    sets: list[EvalSetConfig] = field(default_factory=list)
    """Probe eval sets, e.g. [{name: replay, path: data/replay_eval}] (shards written by `anima-ft prepare`)."""
    max_samples_per_set: int = bounded(0, 0, note="0 = all")
    """Keep the first N samples of each set (sorted by key); 0 = all."""
    sigmas: list[float] = bounded(lo=0, hi=1, lo_open=True, default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    """Absolute sigmas (t in [0, 1]) at which the probe measures the denoising loss."""
    num_noises: int = bounded(8, 1)
    """Fixed noises per (image, sigma)."""
    seed: int = seed_field(0)
    """Seed of the probe's fixed noises (independent of run.seed, so runs with different seeds compare)."""
    drift_every_steps: int = bounded(0, 0, note="0 = off")
    """Log weight drift against the starting weights every N steps (sharded, no gather); 0 = off."""
    drift_per_group: bool = False
    """Also log drift per block-level group (blocks.i.self_attn, ...), not only per kind."""
    budget_max_rise_pct: float = bounded(0.0, 0, note="0 = off")
    """Forgetting budget: act when the `budget_set` probe loss rises more than this % above step 0; 0 = off."""
    budget_action: str = one_of("mark_best", BUDGET_ACTIONS)
    """What the budget does: stop | lower_lr | mark_best."""
    budget_set: str = "replay"
    """The eval set the forgetting budget watches."""
    grid_every_steps: int = bounded(0, 0, note="0 = off")
    """Sample grid every N steps (needs grid_vae_path and the text-encoder paths); 0 = off."""
    grid_prompts: list[str] = field(default_factory=list)
    """Fixed prompts of the sample grid (one row each)."""
    grid_seeds: list[int] = bounded(lo=0, hi=SEED_MAX, default_factory=lambda: [0, 1])
    """Fixed seeds of the sample grid (one column each)."""
    grid_size: list[int] = bounded(lo=16, default_factory=lambda: [1024, 1024])
    """Grid image size [height, width] in pixels (multiples of 16)."""
    grid_num_steps: int = bounded(30, 1)
    """Euler steps per grid image."""
    grid_guidance_scale: float = 4.0
    """CFG scale of the grid (empty negative prompt)."""
    grid_vae_path: str = ""
    """Qwen-Image VAE (official single file or diffusers dir) for decoding grids; empty = grids skipped with a note."""
    grid_qwen_path: str = ""
    """Qwen3-0.6B (HF dir or official single file) to encode the grid prompts once at start."""
    grid_qwen_tokenizer_dir: str = ""
    """Qwen tokenizer directory for the grid prompts."""
    grid_t5_tokenizer_dir: str = ""
    """T5 tokenizer directory for the grid prompts."""


@dataclass
class Config:
    """The whole training config."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    num_steps: int = bounded(100, 0)
    """Total optimizer steps when ``stages`` is empty (otherwise the sum of stage lengths)."""
    stages: list[StageConfig] = field(default_factory=list)
    """Staged schedule; empty = one stage of ``num_steps`` with ``optim.lr`` and constant LR."""
    dist: DistConfig = field(default_factory=DistConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Teacher-student redistribution (anima_ft/distill); off by default."""
