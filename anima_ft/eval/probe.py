"""Fixed-sigma forgetting probe: the denoising loss at absolute sigmas with K fixed noises per (image, sigma).

For an eval set of images ``x_0`` with captions ``c``, a list of sigmas ``s_j`` and ``K`` noises, the probe value is

    L_j = 1/(N K) sum_i sum_k  mean_elements( (v_theta(x_t, s_j, c_i) - (eps_ijk - x_0i))^2 ),
    x_t = (1 - s_j) x_0i + s_j eps_ijk

i.e. the rectified-flow training loss (docs/model.md#objective) at a fixed timestep, averaged over fixed noises.

Determinism. ``eps_ijk`` comes from a CPU ``torch.Generator`` seeded by a stable hash of (probe seed, sample key,
sigma value, k): never from iteration order, so world size, rank sharding, batch size and restarts cannot change it.
The sigma *value* (rounded to 1e-6) is hashed rather than its index, so adding a sigma leaves the other points' noises
unchanged. Each (sample, sigma) is one forward of batch K whatever the world size, and each per-sample loss is
written into a ``[N, num_sigmas]`` float64 matrix that is all-reduced with SUM: every entry is produced by exactly one
rank and the others add ``+0.0``, so the reduced matrix, and the means taken from it in a fixed order, are bitwise the
same on every world size.

ZeRO-3: parameters are gathered by collectives inside each forward, so all ranks must run the same number of
forwards. Ranks with fewer samples then run a throw-away forward on sample 0 (``equal_forwards``, auto-detected from
``param.ds_tensor``).

Shape legend: K noises, C latent channels, h/w latent size, N samples, J sigmas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from anima_ft.eval.eval_sets import EvalSample, check_eval_sets, collate_condition
from anima_ft.runtime import world_and_rank

logger = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.2, 0.4, 0.6, 0.8)
DEFAULT_NUM_NOISES = 8


def noise_seed(key: str, sigma: float, k: int, seed: int = 0) -> int:
    """Stable 63-bit generator seed for noise ``k`` of sample ``key`` at ``sigma`` (blake2b, not Python's hash)."""
    msg = f"anima_ft.probe\x00{seed}\x00{key}\x00{sigma:.6f}\x00{k}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & (2**63 - 1)


def probe_noise(key: str, sigma: float, k: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The fixed standard-normal noise (float32, CPU) for (key, sigma, k) with the given shape."""
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(key, sigma, k, seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def check_sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    """Validate absolute sigmas: non-empty, unique, each in (0, 1]."""
    sig = tuple(float(s) for s in sigmas)
    if not sig:
        raise ValueError("probe sigmas are empty: give at least one, e.g. 0.2,0.4,0.6,0.8")
    bad = [s for s in sig if not 0.0 < s <= 1.0]
    if bad:
        raise ValueError(f"probe sigmas {bad} are outside (0, 1]; sigma is the rectified-flow time t, not t*1000")
    if len({f"{s:.6f}" for s in sig}) != len(sig):
        raise ValueError(f"probe sigmas {sig} contain duplicates (after rounding to 1e-6)")
    return sig


def sigma_label(sigma: float) -> str:
    """Short metric-name label of a sigma: 0.2 -> 'sigma_0.2'."""
    return f"sigma_{sigma:g}"


def _core(model: torch.nn.Module) -> torch.nn.Module:
    """The bare Anima module (unwraps a DeepSpeed engine / DDP ``.module``)."""
    return getattr(model, "module", model)


def _param_info(model: torch.nn.Module) -> tuple[torch.device, torch.dtype, bool]:
    p = next(model.parameters())
    is_zero3 = any(hasattr(q, "ds_tensor") for q in model.parameters())
    return p.device, p.dtype, is_zero3


@torch.no_grad()
def sample_losses(
    model: torch.nn.Module,
    sample: EvalSample,
    sigmas: Sequence[float],
    num_noises: int,
    seed: int = 0,
    split_context: bool | None = None,
) -> torch.Tensor:
    """Probe loss of one sample at each sigma, averaged over its ``num_noises`` fixed noises: float64 ``[J]``.

    ``split_context=True`` runs the adapter once (``encode_context``) and ``denoise`` once per sigma with batch K;
    ``False`` calls the full ``model(x_t, t, qwen, qmask, t5, t5mask)`` instead. ``None`` (default) picks ``False``
    under ZeRO-3: DeepSpeed gathers parameters that a module reads without calling (e.g. q/k-norm weights fed to a
    fused attention op) only inside the root module's forward, so the engine's forward must be the entry point.
    """
    core = _core(model)
    device, dtype, is_zero3 = _param_info(core)
    if split_context is None:
        split_context = not is_zero3
    work = torch.promote_types(dtype, torch.float32)  # float64 models keep float64 math
    cond = collate_condition(sample, device, dtype)
    args = (cond["qwen_states"], cond["qwen_mask"], cond["t5_ids"], cond["t5_mask"])
    ctx = core.encode_context(*args) if split_context else None
    x0 = sample.latents.to(device=device, dtype=work)[None, :, None]  # [1, C, 1, h, w]
    shape = x0.shape[1:]
    out = torch.empty(len(sigmas), dtype=torch.float64)
    for j, sigma in enumerate(sigmas):
        eps = torch.stack([probe_noise(sample.key, sigma, k, shape, seed) for k in range(num_noises)])
        eps = eps.to(device=device, dtype=work)  # [K, C, 1, h, w]
        x_t = ((1.0 - sigma) * x0 + sigma * eps).to(dtype)
        t = torch.full((num_noises,), sigma, device=device, dtype=work)
        if split_context:
            pred = core.denoise(x_t, t, ctx.expand(num_noises, -1, -1))
        else:
            pred = model(x_t, t, *(a.expand(num_noises, *a.shape[1:]) for a in args))
        target = eps.double() - x0.double()
        per_noise = (pred.double() - target).pow(2).flatten(1).mean(dim=1)  # [K]
        out[j] = per_noise.mean().cpu()
    return out


@torch.no_grad()
def evaluate_sets(
    model: torch.nn.Module,
    eval_sets: Mapping[str, Sequence[EvalSample]],
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    num_noises: int = DEFAULT_NUM_NOISES,
    seed: int = 0,
    split_context: bool | None = None,
    equal_forwards: bool | None = None,
    progress: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample probe losses of every set, sharded over ranks and reduced exactly: ``{set: float64 [N, J]}``.

    Call on every rank. Sample ``i`` of each set runs on rank ``i % world_size``; see the module docstring for why
    the reduced result is bitwise independent of the world size. ``progress``: a label for a progress bar on rank 0
    (command-line use; None = no bar).
    """
    sigmas = check_sigmas(sigmas)
    if num_noises < 1:
        raise ValueError(f"num_noises={num_noises} must be >= 1")
    world, rank = world_and_rank()
    device, _, is_zero3 = _param_info(_core(model))
    if equal_forwards is None:
        equal_forwards = is_zero3 and world > 1
    reduce_device = device if (world > 1 and dist.get_backend() == "nccl") else torch.device("cpu")
    was_training = model.training
    model.eval()
    bar = None
    if progress is not None and rank == 0:
        from tqdm import tqdm

        total = sum(math.ceil(len(samples) / world) for samples in eval_sets.values())
        bar = tqdm(total=total, desc=progress, unit="img", dynamic_ncols=True)
    try:
        results: dict[str, torch.Tensor] = {}
        for name, samples in eval_sets.items():
            n = len(samples)
            table = torch.zeros(n, len(sigmas), dtype=torch.float64)
            rounds = math.ceil(n / world) if equal_forwards else len(range(rank, n, world))
            for r in range(rounds):
                i = r * world + rank
                if i < n:
                    table[i] = sample_losses(model, samples[i], sigmas, num_noises, seed, split_context)
                else:  # keep ZeRO-3 collectives in step with the busier ranks; result discarded
                    sample_losses(model, samples[0], sigmas, num_noises, seed, split_context)
                if bar is not None:
                    bar.update(1)
            if world > 1:
                table = table.to(reduce_device)
                dist.all_reduce(table, op=dist.ReduceOp.SUM)
                table = table.cpu()
            results[name] = table
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return results


class ProbeRunner:
    """In-training forgetting probe: call :meth:`run` on every rank at step 0 and every ``every_steps`` steps.

    ``run`` returns ``{"probe/<set>/sigma_<s>": loss, ".../sigma_<s>_rel": loss / step-0 loss, "probe/<set>/mean":
    mean over sigmas, "probe/<set>/mean_rel": ...}`` (plain floats, identical on every rank). The step-0 baseline is
    the first run's values; keep it across restarts with :meth:`state_dict` / :meth:`load_state_dict`.

    With ``log_path``, global rank 0 also appends one JSON line per run to that file, with every image's loss::

        {"step": s, "sigmas": [...], "num_noises": K, "seed": seed, "keys": {set: [key, ...]},
         "per_image": {set: [[loss at sigma_j] per image]}, "metrics": {...as returned...}}

    After a resume the steps between the checkpoint and the crash are probed again and appended again: readers
    keep the last line of each step (:func:`read_probe_log`).
    """

    def __init__(
        self,
        eval_sets: Mapping[str, Sequence[EvalSample]],
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        num_noises: int = DEFAULT_NUM_NOISES,
        seed: int = 0,
        every_steps: int = 0,
        split_context: bool | None = None,
        log_path: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        check_eval_sets(dict(eval_sets))
        self.eval_sets = dict(eval_sets)
        self.sigmas = check_sigmas(sigmas)
        if num_noises < 1:
            raise ValueError(f"num_noises={num_noises} must be >= 1")
        self.num_noises = num_noises
        self.seed = seed
        self.every_steps = every_steps  # 0 = only step 0
        self.split_context = split_context
        self.log_path = None if log_path is None else Path(log_path)
        self.progress = progress  # a progress bar on rank 0 per evaluation (command-line tools)
        self.baseline: dict[str, list[float]] | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def should_run(self, step: int) -> bool:
        """True at step 0 and every ``every_steps`` steps (``every_steps <= 0``: step 0 only)."""
        return step == 0 or (self.every_steps > 0 and step % self.every_steps == 0)

    def evaluate(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Per-sigma mean loss of each set: ``{set: float64 [J]}`` (all ranks must call)."""
        return {name: table.mean(dim=0) for name, table in self._tables(model).items()}

    def _tables(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return evaluate_sets(model, self.eval_sets, self.sigmas, self.num_noises, self.seed, self.split_context,
                             progress="probe" if self.progress else None)

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Evaluate, set the baseline on the first call, and return the flat metric dict (see class docstring)."""
        tables = self._tables(model)
        losses = {name: table.mean(dim=0) for name, table in tables.items()}
        if self.baseline is None:
            self.baseline = {name: v.tolist() for name, v in losses.items()}
            logger.info("probe baseline set at step %d: %s", step, self.baseline)
        metrics = metrics_from_losses(losses, self.sigmas, self.baseline)
        self.history.append((step, metrics))
        if self.log_path is not None and world_and_rank()[1] == 0:
            self._append_log(step, tables, metrics)
        return metrics

    def _append_log(self, step: int, tables: Mapping[str, torch.Tensor], metrics: Mapping[str, float]) -> None:
        line = {"step": step, "sigmas": list(self.sigmas), "num_noises": self.num_noises, "seed": self.seed,
                "keys": {name: [s.key for s in samples] for name, samples in self.eval_sets.items()},
                "per_image": {name: table.tolist() for name, table in tables.items()}, "metrics": dict(metrics)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def state_dict(self) -> dict:
        """Baseline and settings, to store with the training state so relative values survive a restart."""
        return {"baseline": self.baseline, "sigmas": list(self.sigmas), "num_noises": self.num_noises,
                "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the baseline; refuses a state taken with other sigmas, noise count or seed."""
        mine = (list(self.sigmas), self.num_noises, self.seed)
        theirs = (list(state["sigmas"]), state["num_noises"], state["seed"])
        if [f"{s:.6f}" for s in mine[0]] != [f"{s:.6f}" for s in theirs[0]] or mine[1:] != theirs[1:]:
            raise ValueError(
                f"probe state was saved with (sigmas, num_noises, seed)={theirs} but this run uses {mine}; "
                "use the same probe settings on resume or start a fresh baseline"
            )
        self.baseline = None if state["baseline"] is None else {k: list(v) for k, v in state["baseline"].items()}


def metrics_from_losses(
    losses: Mapping[str, torch.Tensor], sigmas: Sequence[float], baseline: Mapping[str, Sequence[float]] | None
) -> dict[str, float]:
    """Flatten ``{set: [J]}`` losses into ``probe/<set>/...`` metrics, with ``_rel`` ratios when a baseline is known."""
    out: dict[str, float] = {}
    for name, vals in losses.items():
        vals = [float(v) for v in vals]
        base = None if baseline is None else baseline.get(name)
        for sigma, v, b in zip(sigmas, vals, base or [None] * len(vals)):
            out[f"probe/{name}/{sigma_label(sigma)}"] = v
            if b:
                out[f"probe/{name}/{sigma_label(sigma)}_rel"] = v / b
        mean = sum(vals) / len(vals)
        out[f"probe/{name}/mean"] = mean
        if base:
            out[f"probe/{name}/mean_rel"] = mean / (sum(base) / len(base))
    return out


def read_probe_log(path: str | Path) -> list[dict]:
    """The lines of a :class:`ProbeRunner` log in step order, the last line of each step winning (see ``log_path``)."""
    path = Path(path)
    by_step: dict[int, dict] = {}
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:  # a crash mid-write leaves a torn last line
            logger.warning("%s line %d is not JSON (%s): skipped", path, n, exc)
            continue
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]
