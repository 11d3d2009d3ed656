"""The training config schema: one dataclass per component, a docstring per field.

Sentinels are spelled out in each field's docstring ("0 = off", "-1 = inherit"). The loader (``loader.py``) merges
defaults < YAML < command-line dotlist in OmegaConf struct mode; ``validate.py`` holds the cross-field checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anima_ft.distill.config import DistillConfig

PARAM_GROUPS = ("base", "self_attn", "cross_attn", "mlp", "mod", "llm_adapter")


@dataclass
class GroupLRs:
    """Learning rate per parameter group (the groups users know from diffusion-pipe / sd-scripts).

    0 freezes a group (no gradients, no optimizer state). Inside a stage, -1 means "inherit ``optim.lr``".
    """

    base: float = 1e-5
    """Embeddings, timestep MLP, final layer and anything not matched by another group."""
    self_attn: float = 1e-5
    """``blocks.*.self_attn.*``."""
    cross_attn: float = 1e-5
    """``blocks.*.cross_attn.*``."""
    mlp: float = 1e-5
    """``blocks.*.mlp.*``."""
    mod: float = 1e-5
    """adaLN modulation: ``blocks.*.adaln_modulation_*`` and ``final_layer.adaln_modulation``."""
    llm_adapter: float = 1e-5
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
    seed: int = 0
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
    size: str = "full"
    """Architecture for random init when ``init_path`` is empty: ``full`` (2B) or ``tiny`` (tests)."""
    attention_backend: str = "sdpa"
    """Attention implementation: ``sdpa``, ``reference`` or ``triton``."""


@dataclass
class SourceConfig:
    """One pre-encoded shard source of the data mixture."""

    name: str = "target"
    """Source name; ``target`` and ``replay`` are the ones stages re-weight."""
    shards: list[str] = field(default_factory=list)
    """Shard paths or glob patterns (webdataset tar files written by ``anima-ft prepare``)."""
    weight: float = 1.0
    """Sampling weight of this source relative to the others."""


@dataclass
class DataConfig:
    """The micro-batch stream."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Shard sources; empty = the built-in synthetic dataset (``synthetic_*`` fields), for tests only."""
    num_workers: int = 2
    """Loader worker processes per rank (0 = load in the training process)."""
    caption_dropout: float = 0.0
    """Probability of replacing a caption by the empty-caption tensors (for CFG)."""
    expected_fingerprint: str = ""
    """Refuse shards whose encoder fingerprint differs; empty = accept any."""
    synthetic_num_samples: int = 32
    """Synthetic dataset size (fixed samples, cycled), used only when ``sources`` is empty."""
    synthetic_latent_size: int = 8
    """Synthetic latent height = width (pixels / 8)."""
    synthetic_num_tokens: int = 8
    """Synthetic caption length in Qwen and T5 tokens."""


@dataclass
class BatchConfig:
    """Batch arithmetic: global = micro * grad_accum * data-parallel world size."""

    micro_batch_size: int = 1
    """Samples per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 = derived, otherwise must equal the product above."""


@dataclass
class OptimConfig:
    """AdamW and gradient handling."""

    lr: GroupLRs = field(default_factory=GroupLRs)
    """Peak learning rate per group (stages may override)."""
    weight_decay: float = 0.01
    """Decoupled weight decay; norms, biases and embeddings get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = off."""
    max_nonfinite_in_row: int = 5
    """A non-finite loss skips the step; this many in a row saves a checkpoint and stops with an error."""


@dataclass
class StageConfig:
    """One stage of a staged schedule."""

    name: str = ""
    """Label used in logs and metrics."""
    num_steps: int = 0
    """Optimizer steps in this stage (must be > 0)."""
    lr: GroupLRs = field(default_factory=_inherit_lrs)
    """Peak LR per group; -1 = inherit ``optim.lr``; 0 = frozen during this stage."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak at the start of the stage."""
    decay: str = "constant"
    """After warmup: ``constant``, ``cosine`` or ``linear`` down to ``min_lr_ratio`` * peak at the stage end."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak LR."""
    replay_fraction: float = -1.0
    """Share of samples drawn from the ``replay`` source (rest from ``target``); -1 = keep source weights."""


@dataclass
class DistConfig:
    """DeepSpeed and parallelism."""

    zero_stage: int = 2
    """ZeRO stage: 1, 2 or 3."""
    offload_optimizer: bool = False
    """Keep optimizer state (and the step) on the CPU (ZeRO-Offload)."""
    precision: str = "bf16"
    """``bf16`` (mixed, fp32 master weights) or ``fp32``."""
    activation_checkpointing: float = 0.0
    """Share of DiT blocks recomputed in backward: 0 = none, 1 = all."""
    compile_blocks: bool = False
    """``torch.compile`` each DiT block."""
    backend: str = "auto"
    """Process-group backend: ``auto`` (nccl on GPU, gloo on CPU), ``nccl`` or ``gloo``."""
    timeout_s: int = 600
    """Collective timeout: a rank that dies makes the others fail within this many seconds."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: merged last into the generated DeepSpeed JSON (and logged)."""


@dataclass
class ObjectiveConfig:
    """The rectified-flow objective (docs/model.md#objective)."""

    timestep_sampling: str = "logit_normal"
    """``logit_normal`` (t = sigmoid(scale * n)) or ``uniform``."""
    sigmoid_scale: float = 1.0
    """Scale of the logit-normal sampler."""
    shift: float = 1.0
    """Timestep shift t' = s t / (1 + (s - 1) t); 1 = none."""


@dataclass
class CheckpointConfig:
    """Sharded training-state checkpoints."""

    every_steps: int = 0
    """Save every N optimizer steps; 0 = off."""
    every_minutes: float = 0.0
    """Save when this many minutes passed since the last save; 0 = off."""
    keep_last: int = 3
    """Number of complete checkpoints kept (older ones deleted); 0 = keep all."""
    resume: str = "auto"
    """``auto`` (from ``latest`` in the run dir when present), ``none``, or a checkpoint directory."""
    save_at_end: bool = True
    """Save a checkpoint after the last step."""
    allow_world_size_change: bool = True
    """Resume a checkpoint saved by another number of ranks: converted once to a DeepSpeed universal checkpoint
    (``step_N/universal``, about the size of the optimizer shards), data position kept, RNGs reseeded (README,
    "Resuming on another world size"); false = refuse."""


@dataclass
class EmaConfig:
    """Exponential moving average of the trainable weights (kept sharded like the fp32 master weights)."""

    decay: float = 0.0
    """EMA_t = decay * EMA_(t-1) + (1 - decay) * W_t after every applied update; 0 = off."""


@dataclass
class LoggingConfig:
    """Metrics and progress."""

    every_steps: int = 1
    """Write a metrics.jsonl line (and wandb) every N steps."""
    wandb_mode: str = "disabled"
    """``online``, ``offline`` or ``disabled``; the API key only from WANDB_API_KEY."""
    wandb_project: str = "anima_ft"
    """wandb project."""
    wandb_entity: str = ""
    """wandb entity; empty = the key's default."""
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0."""
    peak_tflops_per_device: float = 989.0
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

    probe_every_steps: int = 0
    """Run the forgetting probe on eval.sets at step 0 and every N steps; 0 = off."""
    sets: list[EvalSetConfig] = field(default_factory=list)
    """Probe eval sets, e.g. [{name: replay, path: data/replay_eval}] (shards written by `anima-ft prepare`)."""
    max_samples_per_set: int = 0
    """Keep the first N samples of each set (sorted by key); 0 = all."""
    sigmas: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    """Absolute sigmas (t in [0, 1]) at which the probe measures the denoising loss."""
    num_noises: int = 8
    """Fixed noises per (image, sigma)."""
    seed: int = 0
    """Seed of the probe's fixed noises (independent of run.seed, so runs with different seeds compare)."""
    drift_every_steps: int = 0
    """Log weight drift against the starting weights every N steps (sharded, no gather); 0 = off."""
    drift_per_group: bool = False
    """Also log drift per block-level group (blocks.i.self_attn, ...), not only per kind."""
    budget_max_rise_pct: float = 0.0
    """Forgetting budget: act when the `budget_set` probe loss rises more than this % above step 0; 0 = off."""
    budget_action: str = "mark_best"
    """What the budget does: stop | lower_lr | mark_best."""
    budget_set: str = "replay"
    """The eval set the forgetting budget watches."""
    grid_every_steps: int = 0
    """Sample grid every N steps (needs grid_vae_path and the text-encoder paths); 0 = off."""
    grid_prompts: list[str] = field(default_factory=list)
    """Fixed prompts of the sample grid (one row each)."""
    grid_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Fixed seeds of the sample grid (one column each)."""
    grid_size: list[int] = field(default_factory=lambda: [1024, 1024])
    """Grid image size [height, width] in pixels (multiples of 16)."""
    grid_num_steps: int = 30
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
    num_steps: int = 100
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
