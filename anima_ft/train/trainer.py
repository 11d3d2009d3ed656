"""The one shared training loop.

Build order (fixed): stages -> model -> DeepSpeed JSON (buckets sized to the model) -> objective (distillation teacher, if any) -> data stream ->
resume point -> engine (for the stage that wrote the checkpoint) -> diagnostics (snapshot of the starting weights)
-> checkpoint load -> metrics. Each optimizer step: stage transition if the stage changed, per-group LRs,
``grad_accum_steps`` micro-batches through the one loss hook (``objective.build_objective``: flow or distillation), one
small all-reduce (per-source loss sums, stop signals, timed-save vote), then diagnostics, logging and
checkpoints. The diagnostics also run once at step 0, before the first update (the probe's baseline).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
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
from .objective import build_objective, noise_generator
from .param_groups import numel
from .reshard import engine_config, load_universal, prepare_universal
from .stages import build_stages, source_weights, stage_at, total_steps

logger = logging.getLogger(__name__)
PREEMPTED = "preempted"
COUNTERS = ("step", "samples_seen", "tokens_seen", "nonfinite_total", "nonfinite_in_row")
FAULT_ENV = "ANIMA_FT_FAULT"  # test-only fault injection, see Trainer._fault
TRACE_ENV = "ANIMA_FT_TRACE_KEYS"  # test-only sample-key log, see Trainer._trace


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
            rank_state = load_checkpoint(self.engine, ckpt)
            relink_optimizer_state(self.engine)
            if rank_state is not None:
                set_rng_state(rank_state["rng"])
                self.stream.load_state_dict(rank_state["data"])
            logger.info("resumed from %s at step %d", ckpt, self.state["step"])
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

    def _fault(self, step: int, batch: dict) -> None:
        """Test-only fault injection from ``ANIMA_FT_FAULT``: ``kill:STEP:RANK`` (SIGKILL), ``signal:STEP:RANK``
        (SIGUSR1, a preemption notice) or ``nan:FIRST[-LAST]`` (NaN latents on every rank); STEP is 0-based."""
        spec = os.environ.get(FAULT_ENV, "")
        if not spec:
            return
        kind, at, *rest = spec.split(":")
        first, _, last = at.partition("-")
        if not int(first) <= step <= int(last or first):
            return
        if kind == "kill" and int(rest[0]) == self.env.rank:
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "signal" and int(rest[0]) == self.env.rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        elif kind == "nan":
            batch["latents"] = batch["latents"] * float("nan")

    def _trace(self, step: int, index: int, batch: dict) -> None:
        """Test-only: with ``ANIMA_FT_TRACE_KEYS=DIR`` append ``{step, index, keys}`` of each micro-batch (``index``
        = its place j in the global batch) to ``DIR/rank_XXXXX.jsonl``, to check the global sample sequence."""
        trace_dir = os.environ.get(TRACE_ENV, "")
        if trace_dir:
            with open(Path(trace_dir) / f"rank_{self.env.rank:05d}.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "index": index, "keys": list(batch["key"])}) + "\n")

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
        return row

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> str:
        """Run to the last step; returns ``"done"`` or ``"preempted"`` (after saving, on SIGTERM / SIGUSR1)."""
        cfg, env = self.cfg, self.env
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        accum, n_src = cfg.batch.grad_accum_steps, len(self.sources)
        bar = None
        if env.rank == 0 and cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.state["step"], desc="train", dynamic_ncols=True)
        it = iter(self.stream)
        t_last, samples_last = time.perf_counter(), self.state["samples_seen"]
        if self.state["step"] == 0 and self.eval_hooks is not None:
            self.metrics.log(0, self.eval_hooks(0, self.engine))  # step-0 baseline, before any update
        while self.state["step"] < self.total:
            step = self.state["step"]
            stage = stage_at(self.stages, step)
            if stage.index != self.stage.index:
                transition(self, self.model, cfg, self.stage, stage, self.ds_config)  # replaces self.engine
                self.stage = stage
                self.objective.set_stage(stage.index)
                if self.base_weights:
                    self.stream.set_weights(source_weights(stage, self.base_weights))
            lrs = stage.lrs(step)
            if self.eval_hooks is not None and self.eval_hooks.lr_scale != 1.0:  # forgetting budget lowered the LR
                lrs = {g: v * self.eval_hooks.lr_scale for g, v in lrs.items()}
            set_lrs(self.engine, lrs)
            skipped_before = self.engine.skipped_steps
            # on device: [loss sum per source, sample count per source, stop signal, timed-save vote]
            sums = torch.zeros(2 * n_src + 2, dtype=torch.float64, device=env.device)
            tokens = 0
            for micro in range(accum):
                batch = next(it)
                self._fault(step, batch)
                index = micro * env.world_size + env.rank  # the micro-batch's place j in the global batch
                self._trace(step, index, batch)
                gen = noise_generator(cfg.run.seed, step, index)
                out = self.objective(self.engine, batch, gen)
                self.engine.backward(out.loss)
                self.engine.step()
                src = batch["source_id"].to(env.device)
                sums[:n_src].index_add_(0, src, out.per_sample.double())
                sums[n_src:2 * n_src].index_add_(0, src, torch.ones_like(src, dtype=torch.float64))
                tokens += self._tokens_per_sample(batch) * len(src)
            sums[-2] = float(self._stop_signal)
            due = cfg.checkpoint.every_minutes > 0 and time.monotonic() - self._last_save > 60 * cfg.checkpoint.every_minutes
            sums[-1] = float(due and env.rank == 0)
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
            if step % cfg.logging.every_steps == 0 or step == self.total or skipped or eval_metrics:
                now = time.perf_counter()
                rate = (self.state["samples_seen"] - samples_last) / max(now - t_last, 1e-9)
                row = self._metrics_row(stage.index, lrs, sums, rate, tokens / max(1, n_samples // env.world_size))
                row.update(eval_metrics)
                self.metrics.log(step, row)
                t_last, samples_last = now, self.state["samples_seen"]
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", stage=stage.name)
            if bar is not None:
                bar.update(1)
            if self.state["nonfinite_in_row"] >= cfg.optim.max_nonfinite_in_row:
                self.save()
                raise NonFiniteLossError(
                    f"{self.state['nonfinite_in_row']} non-finite losses in a row at step {step} (limit "
                    f"optim.max_nonfinite_in_row={cfg.optim.max_nonfinite_in_row}); saved a checkpoint and stopped. "
                    f"Lower the learning rate or inspect the data around samples_seen={self.state['samples_seen']}")
            every = cfg.checkpoint.every_steps
            saved = bool((every and step % every == 0) or sums[-1] > 0 or sums[-2] > 0)
            if saved:
                self.save()
            if eval_metrics and self.eval_hooks.best_step is not None and env.rank == 0:  # changes only at a probe
                write_json_atomic(self.run_dir / "best_step.json", {"best_step": self.eval_hooks.best_step})
            if self.eval_hooks is not None and self.eval_hooks.stop_requested:
                if not saved:
                    self.save()
                logger.warning("stopping at step %d: the forgetting budget was exceeded (eval.budget_max_rise_pct="
                               "%g on set %r); checkpoint saved", step, cfg.eval.budget_max_rise_pct, cfg.eval.budget_set)
                if bar is not None:
                    bar.close()
                self.metrics.close()
                return "budget_stop"
            if sums[-2] > 0:
                logger.warning("stopping at step %d after a stop signal (checkpoint saved)", step)
                if bar is not None:
                    bar.close()
                self.metrics.close()
                return PREEMPTED
        every = cfg.checkpoint.every_steps
        if cfg.checkpoint.save_at_end and not (every and self.state["step"] % every == 0):
            self.save()
        if bar is not None:
            bar.close()
        self.metrics.close()
        return "done"
