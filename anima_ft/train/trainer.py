"""The one shared training loop.

Build order (fixed): stages -> model -> DeepSpeed JSON (buckets sized to the model) -> objective (distillation teacher, if any) -> data stream ->
resume point -> engine (for the stage that wrote the checkpoint) -> diagnostics (snapshot of the starting weights)
-> checkpoint load -> metrics. Each optimizer step: stage transition if the stage changed, per-group LRs,
``grad_accum_steps`` micro-batches through the one loss hook (``objective.build_objective``: flow or distillation), one
small all-reduce (per-source loss sums, stop signals, timed-save vote), then diagnostics, logging and
checkpoints. The diagnostics also run once at step 0, before the first update (the probe's baseline).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from anima_ft.config import build_deepspeed_config, global_batch_size, to_dict, to_yaml
from anima_ft.config.schema import Config
from anima_ft.eval.from_config import build_eval_hooks
from anima_ft.observability import MetricsWriter, train_flops_per_sample
from anima_ft.runtime import write_json_atomic

from .batches import build_stream, source_names
from .checkpoint import (
    load_checkpoint,
    read_rank_states,
    read_trainer_state,
    reseed_rng,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import DistEnv
from .engine import (
    build_engine,
    group_steps,
    materialize_state,
    relink_optimizer_state,
    set_lrs,
    transition,
    update_ema,
)
from .fault_injection import instrument
from .objective import build_objective, noise_generator
from .param_groups import numel
from .reshard import engine_config, load_universal, prepare_universal
from .stages import build_stages, source_weights, stage_at, total_steps

logger = logging.getLogger(__name__)
DONE, PREEMPTED, BUDGET_STOP = "done", "preempted", "budget_stop"  # what Trainer.train returns
COUNTERS = ("step", "samples_seen", "tokens_seen", "nonfinite_total", "nonfinite_in_row")
_SLOT_STOP, _SLOT_TIMED_SAVE = -2, -1  # the step's two control votes, packed after the loss sums for one all-reduce


@dataclass
class StepResult:
    """What one optimizer step reports to the logging and the checkpoint/stop policy (the same on every rank)."""

    step: int  # the step just taken, 1-based
    stage: object  # the Stage it ran in
    lrs: dict  # peak-scaled LR per group
    sums: torch.Tensor  # [2 * num_sources] float64: loss sum per source, then sample count per source
    tokens: int  # tokens this rank processed
    samples: int  # samples over all ranks
    skipped: bool  # non-finite loss or gradients: the update was skipped
    stop_signal: bool  # some rank received SIGTERM / SIGUSR1
    timed_save: bool  # checkpoint.every_minutes elapsed on rank 0's clock
    eval_metrics: dict  # diagnostics measured at this step ({} when none ran)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row (a checkpoint was saved first)."""


def build_model(cfg: Config):
    """The Anima module from ``model.init_path`` (official file) or a seeded random init of ``model.size``."""
    from anima_ft.model import AnimaConfig, build_anima, load_anima

    if cfg.model.init_path:
        dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
        model = load_anima(cfg.model.init_path, adapter_path=cfg.model.adapter_path or None, dtype=dtype)
    else:
        acfg = AnimaConfig.tiny() if cfg.model.size == "tiny" else AnimaConfig()
        model = build_anima(acfg, device="cpu", dtype=torch.float32, seed=cfg.run.seed)
    model.set_attention_backend(cfg.model.attention_backend)
    model.set_activation_checkpointing(cfg.dist.activation_checkpointing)
    if cfg.dist.compile_blocks:
        for block in model.blocks:
            block.compile()
    return model


class Trainer:
    """Fine-tunes Anima with DeepSpeed ZeRO over a staged schedule; ``train()`` runs to the end or a stop signal."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.stages = build_stages(cfg)
        self.total = total_steps(self.stages)
        self.model = build_model(cfg)
        self.ds_config = build_deepspeed_config(cfg, env.world_size, sum(p.numel() for p in self.model.parameters()))
        self.model_cfg = self.model.cfg
        # the teacher is copied from the untouched student, before an adapter source may replace its adapter
        self.objective = build_objective(cfg, self.model, self.ds_config, env.device)
        qwen_dim = self.model_cfg.adapter.source_dim if self.model_cfg.adapter else 1024
        self.stream = build_stream(cfg, qwen_dim, env.rank, env.world_size)
        self.sources = source_names(cfg)
        self.base_weights = {s.name: s.weight for s in cfg.data.sources}

        ckpt = resolve_resume(self.ckpt_root, cfg.checkpoint.resume)  # rolls newer checkpoints aside
        loaded = read_trainer_state(ckpt) if ckpt else {}
        self.state = {k: int(loaded.get(k, 0)) for k in COUNTERS}
        saved_world = int(loaded.get("world_size", env.world_size))
        reshard = ckpt is not None and saved_world != env.world_size
        if reshard and not cfg.checkpoint.allow_world_size_change:
            raise ValueError(f"{ckpt} was saved by {saved_world} ranks and this run has {env.world_size}; resume on "
                             f"{saved_world} ranks or set checkpoint.allow_world_size_change=true")
        # the engine of the stage that took the last update; a boundary transition then happens in the loop
        self.stage = stage_at(self.stages, max(self.state["step"] - 1, 0))
        self.engine = build_engine(self.model, cfg, self.stage,
                                   engine_config(self.ds_config) if reshard else self.ds_config)
        self.objective.set_stage(self.stage.index)
        if cfg.ema.decay > 0:
            materialize_state(self.engine, ema=True)  # the EMA is an optimizer-state entry (engine.update_ema)
        self.eval_hooks = build_eval_hooks(cfg, self.model, self.run_dir, env.device)
        if self.eval_hooks is not None and loaded.get("eval_hooks"):
            self.eval_hooks.load_state_dict(loaded["eval_hooks"])
        if ckpt and reshard:
            self._resume_on_new_world_size(ckpt, saved_world)
        elif ckpt:
            started = time.monotonic()
            rank_state = load_checkpoint(self.engine, ckpt)
            relink_optimizer_state(self.engine)
            if rank_state is not None:
                set_rng_state(rank_state["rng"])
                self.stream.load_state_dict(rank_state["data"])
            logger.info("resumed from %s at step %d (loaded in %.1f s)", ckpt, self.state["step"],
                        time.monotonic() - started)
        elif self.base_weights:
            self.stream.set_weights(source_weights(self.stage, self.base_weights))
        if ckpt and loaded.get("global_batch_size", self.global_batch) != self.global_batch:
            logger.warning("global batch size %d -> %d: the LR schedule counts optimizer steps and is not rescaled, "
                           "so the remaining steps see %d instead of %d samples each (samples_seen stays exact)",
                           loaded["global_batch_size"], self.global_batch, self.global_batch,
                           loaded["global_batch_size"])
        self._stop_signal = 0
        self._last_save = time.monotonic()
        if env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics = MetricsWriter(self.run_dir, env.rank, cfg.logging.wandb_mode, cfg.logging.wandb_project,
                                     cfg.logging.wandb_entity, cfg.run.name, to_dict(cfg))
        self.num_params = sum(numel(p) for p in self.model.parameters())

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return global_batch_size(self.cfg, self.env.world_size)

    def _resume_on_new_world_size(self, ckpt: Path, saved_world: int) -> None:
        """Load a checkpoint of ``saved_world`` ranks: universal model/optimizer state, the global data position,
        RNG reseeded (collective; see ``reshard.py`` and the README section on resuming)."""
        cfg, env, step = self.cfg, self.env, self.state["step"]
        logger.warning("resuming %s (step %d) on %d ranks; it was saved by %d ranks: loading the model and optimizer "
                       "through a DeepSpeed universal checkpoint", ckpt, step, env.world_size, saved_world)
        ema = cfg.ema.decay > 0
        prepare_universal(ckpt, [n for n, _ in self.model.named_parameters()], ema)
        load_universal(self.engine, self.model, ckpt, ema)
        relink_optimizer_state(self.engine)
        self.stream.load_state_dicts([s["data"] for s in read_rank_states(ckpt, saved_world)])
        reseed_rng(cfg.run.seed, step, env.rank)
        logger.warning("world size %d -> %d: fp32 weights, Adam moments and step counts%s restored exactly; the %d "
                       "saved per-rank RNG states cannot map to %d ranks, so python/numpy/torch RNGs were reseeded "
                       "from (run.seed, step %d, rank) (training noise does not use them: it is seeded per global "
                       "micro-batch)", saved_world, env.world_size, ", EMA" if cfg.ema.decay > 0 else "",
                       saved_world, env.world_size, step)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        logger.warning("received signal %d: checkpointing at the end of this step, then exiting", signum)
        self._stop_signal = 1

    def save(self) -> Path:
        """Checkpoint the current state (collective)."""
        rank_state = {"rng": rng_state(), "data": self.stream.state_dict()}
        trainer_state = {**self.state, "stage": self.stage.index, "world_size": self.env.world_size,
                         "global_batch_size": self.global_batch,
                         "optimizer_steps": {k: float(v) for k, v in group_steps(self.engine).items()},
                         "model_config": self.model_cfg.to_dict(), "train_config": to_yaml(self.cfg)}
        if self.eval_hooks is not None:
            trainer_state["eval_hooks"] = self.eval_hooks.state_dict()
        path = save_checkpoint(self.engine, self.ckpt_root, self.state["step"], trainer_state, rank_state,
                               self.cfg.checkpoint.keep_last)
        self._last_save = time.monotonic()
        return path

    def _tokens_per_sample(self, batch: dict) -> int:
        h, w = batch["latents"].shape[-2:]
        p = self.model_cfg.patch_spatial
        return (h // p) * (w // p)

    def _metrics_row(self, stage: int, lrs: dict, sums: torch.Tensor, rate: float, tokens_per_sample: float) -> dict:
        """One metrics.jsonl row from the step's reduced sums ([loss sum, count] per source) and throughput."""
        n_src, cfg, mc = len(self.sources), self.cfg, self.model_cfg
        count = float(sums[n_src:2 * n_src].sum())
        row = {"loss": float(sums[:n_src].sum()) / max(1.0, count), "stage": stage,
               "samples_seen": self.state["samples_seen"], "nonfinite_total": self.state["nonfinite_total"],
               "samples_per_s": rate, "tokens_per_s": rate * tokens_per_sample}
        for i, name in enumerate(self.sources):
            if sums[n_src + i] > 0:
                row[f"loss/{name}"] = float(sums[i] / sums[n_src + i])
        row.update({f"lr/{g}": v for g, v in lrs.items()})
        norm = self.engine.get_global_grad_norm()
        row["grad_norm"] = float(norm) if norm is not None else None
        flops = train_flops_per_sample(self.num_params, int(tokens_per_sample), mc.num_blocks, mc.model_channels,
                                       mc.context_tokens)
        row["mfu"] = rate * flops / (self.env.world_size * cfg.logging.peak_tflops_per_device * 1e12)
        peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
        row["peak_mem_gb"] = peak / 2**30
        stats = self.stream.stats()  # this rank's counters: skipped samples by reason, remote I/O (URL shards)
        row.update({f"data/skipped/{reason}": n for reason, n in stats.get("skipped", {}).items()})
        row.update({f"data/io_{k}": v for k, v in stats.get("io", {}).items() if isinstance(v, int)})
        return row

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> str:
        """Run to the last step; returns ``DONE``, ``PREEMPTED`` (after saving, on SIGTERM / SIGUSR1) or
        ``BUDGET_STOP`` (the forgetting budget was exceeded; saved)."""
        cfg, env = self.cfg, self.env
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        bar = None
        if env.rank == 0 and cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.state["step"], desc="train", dynamic_ncols=True)
        batches = instrument(iter(self.stream), self.state["step"], cfg.batch.grad_accum_steps, env.rank,
                             env.world_size)
        self._rate_clock = (time.perf_counter(), self.state["samples_seen"])
        try:
            if self.state["step"] == 0 and self.eval_hooks is not None:
                self.metrics.log(0, self.eval_hooks(0, self.engine))  # step-0 baseline, before any update
            while self.state["step"] < self.total:
                result = self.train_step(batches)
                self._log_step(result, bar)
                outcome = self._checkpoint_and_stop(result)
                if outcome is not None:
                    return outcome
            every = cfg.checkpoint.every_steps
            if cfg.checkpoint.save_at_end and not (every and self.state["step"] % every == 0):
                self.save()
            return DONE
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()

    def train_step(self, batches) -> StepResult:
        """One optimizer step: stage transition, LRs, ``grad_accum_steps`` micro-batches, the one host sync."""
        cfg, env, n_src = self.cfg, self.env, len(self.sources)
        step = self.state["step"]
        stage = self._enter_stage(step)
        lrs = stage.lrs(step)
        if self.eval_hooks is not None and self.eval_hooks.lr_scale != 1.0:  # forgetting budget lowered the LR
            lrs = {g: v * self.eval_hooks.lr_scale for g, v in lrs.items()}
        set_lrs(self.engine, lrs)
        skipped_before = self.engine.skipped_steps
        # on device: [loss sum per source, sample count per source, stop signal, timed-save vote]
        sums = torch.zeros(2 * n_src + 2, dtype=torch.float64, device=env.device)
        tokens = 0
        for micro in range(cfg.batch.grad_accum_steps):
            batch = next(batches)
            index = micro * env.world_size + env.rank  # the micro-batch's place j in the global batch
            out = self.forward_backward(batch, noise_generator(cfg.run.seed, step, index))
            src = batch["source_id"].to(env.device)
            sums[:n_src].index_add_(0, src, out.per_sample.double())
            sums[n_src:2 * n_src].index_add_(0, src, torch.ones_like(src, dtype=torch.float64))
            tokens += self._tokens_per_sample(batch) * len(src)
        every_s = 60 * cfg.checkpoint.every_minutes
        sums[_SLOT_STOP] = float(self._stop_signal)
        sums[_SLOT_TIMED_SAVE] = float(env.rank == 0 and every_s > 0 and time.monotonic() - self._last_save > every_s)
        dist.all_reduce(sums)
        sums = sums.cpu()  # the one host sync per step: every rank must agree on skip / save / stop
        self.state["step"] = step = step + 1
        n_samples = int(sums[n_src:2 * n_src].sum().item())
        self.state["samples_seen"] += n_samples
        self.state["tokens_seen"] += tokens * env.world_size
        loss = float(sums[:n_src].sum() / max(1, n_samples))
        skipped = self.engine.skipped_steps != skipped_before or not torch.isfinite(torch.tensor(loss))
        if cfg.ema.decay > 0 and self.engine.skipped_steps == skipped_before:
            update_ema(self.engine, cfg.ema.decay)
        if skipped:
            self.state["nonfinite_total"] += 1
            self.state["nonfinite_in_row"] += 1
            logger.warning("step %d: non-finite loss/gradients (%s); update skipped (%d in a row)", step, loss,
                           self.state["nonfinite_in_row"])
        else:
            self.state["nonfinite_in_row"] = 0
        eval_metrics = self.eval_hooks(step, self.engine) if self.eval_hooks is not None else {}
        return StepResult(step=step, stage=stage, lrs=lrs, sums=sums[:2 * n_src], tokens=tokens, samples=n_samples,
                          skipped=skipped, stop_signal=bool(sums[_SLOT_STOP] > 0),
                          timed_save=bool(sums[_SLOT_TIMED_SAVE] > 0), eval_metrics=eval_metrics)

    def forward_backward(self, batch: dict, generator: torch.Generator):
        """The loss hook on one micro-batch, its backward, and the engine's step (an update at the boundary)."""
        out = self.objective(self.engine, batch, generator)
        self.engine.backward(out.loss)
        self.engine.step()
        return out

    def _enter_stage(self, step: int):
        """The stage of ``step``; at a boundary: the transition (new engine), the objective's and data mix's stage."""
        stage = stage_at(self.stages, step)
        if stage.index != self.stage.index:
            transition(self, self.model, self.cfg, self.stage, stage, self.ds_config)  # replaces self.engine
            self.stage = stage
            self.objective.set_stage(stage.index)
            if self.base_weights:
                self.stream.set_weights(source_weights(stage, self.base_weights))
        return stage

    def _log_step(self, r: StepResult, bar) -> None:
        """metrics.jsonl (and wandb) every ``logging.every_steps``, at the end, on skipped and probe steps."""
        if r.step % self.cfg.logging.every_steps == 0 or r.step == self.total or r.skipped or r.eval_metrics:
            now = time.perf_counter()
            t_last, samples_last = self._rate_clock
            rate = (self.state["samples_seen"] - samples_last) / max(now - t_last, 1e-9)
            per_rank = max(1, r.samples // self.env.world_size)
            row = self._metrics_row(r.stage.index, r.lrs, r.sums, rate, r.tokens / per_rank)
            row.update(r.eval_metrics)
            self.metrics.log(r.step, row)
            self._rate_clock = (now, self.state["samples_seen"])
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", stage=r.stage.name)
        if bar is not None:
            bar.update(1)

    def _checkpoint_and_stop(self, r: StepResult) -> str | None:
        """The checkpoint and stop policy, in one place: returns the outcome when the run stops after this step."""
        cfg = self.cfg
        if self.state["nonfinite_in_row"] >= cfg.optim.max_nonfinite_in_row:
            self.save()
            raise NonFiniteLossError(
                f"{self.state['nonfinite_in_row']} non-finite losses in a row at step {r.step} (limit "
                f"optim.max_nonfinite_in_row={cfg.optim.max_nonfinite_in_row}); saved a checkpoint and stopped. "
                f"Lower the learning rate or inspect the data around samples_seen={self.state['samples_seen']}")
        every = cfg.checkpoint.every_steps
        saved = bool((every and r.step % every == 0) or r.timed_save or r.stop_signal)
        if saved:
            self.save()
        hooks = self.eval_hooks
        if r.eval_metrics and hooks.best_step is not None and self.env.rank == 0:  # changes only at a probe
            write_json_atomic(self.run_dir / "best_step.json", {"best_step": hooks.best_step})
        if hooks is not None and hooks.stop_requested:
            if not saved:
                self.save()
            logger.warning("stopping at step %d: the forgetting budget was exceeded (eval.budget_max_rise_pct=%g on "
                           "set %r); checkpoint saved", r.step, cfg.eval.budget_max_rise_pct, cfg.eval.budget_set)
            return BUDGET_STOP
        if r.stop_signal:
            logger.warning("stopping at step %d after a stop signal (checkpoint saved)", r.step)
            return PREEMPTED
        return None
