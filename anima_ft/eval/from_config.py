"""Build the in-training diagnostics (:class:`EvalHooks`) from the training config's ``eval`` section."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from anima_ft.eval.budget import ForgettingBudget
from anima_ft.eval.drift_tracker import DriftTracker
from anima_ft.eval.eval_sets import load_shard_eval_set
from anima_ft.eval.hooks import EvalHooks
from anima_ft.eval.probe import ProbeRunner
from anima_ft.eval.sample_grid import SampleGridRunner, encode_prompts

logger = logging.getLogger(__name__)


def _build_grid(e, run_dir: Path, device: torch.device | str) -> SampleGridRunner | None:
    """The sample-grid runner, or None with one clear message when no VAE is configured."""
    if e.grid_every_steps <= 0:
        return None
    if not e.grid_vae_path:
        logger.warning("eval.grid_every_steps=%d but eval.grid_vae_path is empty: sample grids are skipped "
                       "(set the VAE and text-encoder paths to get PNG grids)", e.grid_every_steps)
        return None
    from anima_ft.model.text_encoder import TextEncoder
    from anima_ft.model.vae import AnimaVAE

    text = TextEncoder.from_pretrained(e.grid_qwen_path, e.grid_qwen_tokenizer_dir, e.grid_t5_tokenizer_dir,
                                       device=device)
    conditions = encode_prompts(text, e.grid_prompts)
    del text  # the frozen text encoder is needed only once, for the fixed prompts
    vae_path = Path(e.grid_vae_path)
    vae = (AnimaVAE.from_pretrained(vae_path, device=device) if vae_path.is_dir()
           else AnimaVAE.from_single_file(vae_path, device=device))
    h, w = (int(x) for x in e.grid_size)
    return SampleGridRunner(list(e.grid_prompts), conditions, list(e.grid_seeds), vae, run_dir,
                            every_steps=e.grid_every_steps, num_steps=e.grid_num_steps,
                            guidance_scale=e.grid_guidance_scale, latent_size=(h // 8, w // 8))


def build_eval_hooks(cfg, model: nn.Module, run_dir: str | Path, device: torch.device | str = "cpu") -> EvalHooks | None:
    """Probe, forgetting budget, drift and grid from ``cfg.eval``; None when every diagnostic is off.

    Call on every rank after the engine is built and BEFORE a checkpoint is loaded: the drift tracker snapshots the
    starting weights (``model.init_path`` or the seeded init), so drift is measured from the true start on resume.
    """
    e = cfg.eval
    probe = None
    if e.sets and e.probe_every_steps > 0:
        sets = {s.name: load_shard_eval_set(s.path, name=s.name, limit=e.max_samples_per_set or None,
                                           remote=cfg.data.remote) for s in e.sets}
        probe = ProbeRunner(sets, list(e.sigmas), e.num_noises, e.seed, every_steps=e.probe_every_steps,
                            log_path=Path(run_dir) / "probe.jsonl")
    budget = None
    if e.budget_max_rise_pct > 0:
        budget = ForgettingBudget(e.budget_max_rise_pct, e.budget_action, replay_set=e.budget_set)
    drift = DriftTracker(model, every_steps=e.drift_every_steps, per_group=e.drift_per_group) \
        if e.drift_every_steps > 0 else None
    grid = _build_grid(e, Path(run_dir), device)
    if probe is None and drift is None and grid is None:
        return None
    return EvalHooks(probe=probe, drift=drift, grid=grid, budget=budget)
