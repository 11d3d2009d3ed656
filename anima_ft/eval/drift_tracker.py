"""In-training weight drift against the starting weights, from sharded parameters, without gathering the model.

Same quantities as ``anima-ft drift`` (:mod:`anima_ft.eval.drift`): per group the sums ``||w - w_0||^2``,
``||w_0||^2``, ``||w||^2`` and ``<w_0, w>``, from which ``rel = ||w - w_0|| / ||w_0||`` and the cosine follow.
Sums of squares are additive over any partition of the elements, which is what makes the sharded path exact:

* **ZeRO-3** (``param.ds_tensor`` present): every rank holds a flat slice of every parameter. Each rank keeps a CPU
  float32 copy of *its own slice* at construction, and at :meth:`DriftTracker.measure` sums over its slice; the
  zero padding DeepSpeed adds to the last slice is zero in both copies and adds nothing.
* **Replicated parameters** (plain module, DDP, ZeRO-1/2): rank ``r`` handles tensors ``r, r + W, r + 2W, ...``
  (by name order), so the starting copies are split over ranks instead of duplicated.

One ``all_reduce`` of a ``[G, 4]`` float64 tensor then gives the totals on every rank. Partial sums are accumulated
on the parameters' device and synchronised only once per measurement.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from anima_ft.eval.drift import rel_and_cos
from anima_ft.model.groups import drift_group as group_of
from anima_ft.model.groups import group_sort_key, is_ignored, strip_prefix
from anima_ft.model.groups import lr_group_of_drift_group as kind_of
from anima_ft.runtime import world_and_rank

logger = logging.getLogger(__name__)


class DriftTracker:
    """Drift of the live (possibly sharded) parameters from their values when the tracker was built.

    Build it on every rank right after the model (or the DeepSpeed engine) is set up and before the first optimizer
    step; call :meth:`measure` on every rank every ``every_steps`` steps (it all-reduces). ``per_group=True`` also
    returns one entry per block-level group (``drift/group/blocks.7.mlp/rel``, ...); the coarse ``drift/<kind>/rel``
    and ``drift/total/rel`` entries are always there. ``keep_on_device=True`` keeps the starting copy on the GPU
    (faster, costs memory) instead of CPU.
    """

    def __init__(self, model: torch.nn.Module, every_steps: int = 0, per_group: bool = False,
                 keep_on_device: bool = False) -> None:
        self.every_steps = every_steps
        self.per_group = per_group
        world, rank = world_and_rank()
        named = [(strip_prefix(n), p) for n, p in model.named_parameters()]
        named = [(n, p) for n, p in named if not is_ignored(n)]
        if not named:
            raise ValueError("DriftTracker: the model has no parameters to track")
        self.groups = sorted({group_of(n) for n, _ in named}, key=group_sort_key)
        index = {g: i for i, g in enumerate(self.groups)}
        self.zero3 = any(hasattr(p, "ds_tensor") for _, p in named)
        self._tracked: list[tuple[int, torch.nn.Parameter, torch.Tensor]] = []
        for i, (name, p) in enumerate(sorted(named, key=lambda np_: np_[0])):
            if not self.zero3 and i % world != rank:
                continue
            local = self._local(p)
            start = local.detach().to(torch.float32).clone()
            if not keep_on_device:
                start = start.cpu()
            self._tracked.append((index[group_of(name)], p, start))
        self.device = self._local(named[0][1]).device
        logger.info("DriftTracker: %d tensors on this rank (%s), %d groups", len(self._tracked),
                    "ZeRO-3 partitions" if self.zero3 else f"1 of every {world}", len(self.groups))

    @staticmethod
    def _local(p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of ``p`` under ZeRO-3, else the whole tensor."""
        return p.ds_tensor if hasattr(p, "ds_tensor") else p

    def should_run(self, step: int) -> bool:
        """True every ``every_steps`` steps (``every_steps <= 0``: never)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    @torch.no_grad()
    def group_sums(self) -> torch.Tensor:
        """All-reduced float64 ``[G, 4]`` sums (sq_diff, sq_start, sq_now, dot) in ``self.groups`` order."""
        sums = torch.zeros(len(self.groups), 4, dtype=torch.float64, device=self.device)
        for g, p, start in self._tracked:
            cur = self._local(p).detach().to(torch.float64).reshape(-1)
            w0 = start.to(cur.device, non_blocking=True).to(torch.float64).reshape(-1)
            sums[g] += torch.stack([(cur - w0).square().sum(), w0.square().sum(), cur.square().sum(), (w0 * cur).sum()])
        world, _ = world_and_rank()
        if world > 1:
            if dist.get_backend() != "nccl":
                sums = sums.cpu()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums.cpu()

    def measure(self) -> dict[str, float]:
        """``{"drift/<kind>/rel": ..., "drift/<kind>/cos": ..., "drift/total/rel": ...}`` (+ per group if asked)."""
        sums = self.group_sums()
        out: dict[str, float] = {}
        kinds: dict[str, torch.Tensor] = {}
        for g, row in zip(self.groups, sums):
            kinds[kind_of(g)] = kinds.get(kind_of(g), torch.zeros(4, dtype=torch.float64)) + row
            if self.per_group:
                out[f"drift/group/{g}/rel"], out[f"drift/group/{g}/cos"] = rel_and_cos(*row.tolist())
        kinds["total"] = sums.sum(dim=0)
        for k, row in kinds.items():
            out[f"drift/{k}/rel"], out[f"drift/{k}/cos"] = rel_and_cos(*row.tolist())
        return out
