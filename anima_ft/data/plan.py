"""The deterministic mixing plan: which samples of which source and bucket fill every micro-batch of a global batch.

Every rank and every loader worker runs the same planner from the same state, so the plan needs no communication;
each consumer then loads only its own micro-batches. For global batch ``g`` with ``B = M * A * W`` samples
(micro-batch size M, grad accumulation A, data-parallel world W):

1. **Counts per source (exact mix with a carried error).** With normalized weights ``w_s`` and carry ``c_s``
   (start 0): ``t_s = c_s + w_s * B``, ``n_s = max(0, floor(t_s))``, the ``B - sum(n_s)`` leftover samples go
   to the largest fractional parts (ties to the earlier source), ``c_s <- t_s - n_s``. So ``sum n_s = B``, the
   carry stays bounded, the long-run share is exactly ``w_s``, and with two sources ``n_s = w_s * B`` whenever
   ``w_s * B`` is an integer (floor or ceil of it otherwise).
2. **Slots.** The B labels are interleaved evenly (label k of source s sits at ``(k + 0.5) / n_s``), cut into
   ``A * W`` chunks of M, and the chunks are assigned to micro-batch indices ``j = a * W + rank`` by a
   permutation drawn from ``(seed, g)``.
3. **Bucket per micro-batch.** Drawn from ``(seed, g)`` with probability proportional to the number of samples in
   the bucket over all sources with positive weight, among the buckets every source needed by the chunk has. The
   choice does not depend on which source is in the chunk, so the mix holds within every bucket over time.
4. **Samples.** Each (source, bucket) pair walks its own permutation of its samples, reshuffled per epoch from
   ``(seed, source name, bucket, epoch)``; every epoch of a pair uses each of its samples exactly once.
5. **Caption dropout** flags are drawn per slot from ``(seed, g)``.

Steps 1-4 run as array operations over all micro-batches; only the micro-batches a consumer asks for get their
sample ids, so a rank's planning cost per sample it loads does not grow with the world size.

The state (global batch index, weights, carry, cursors) describes global positions only, never ranks, so it can be
loaded into a planner of any layout. Global batch ``g`` depends on the state, the seed, ``M`` and the number of
micro-batches ``A * W`` alone: a layout with the same ``M`` and ``A * W`` (e.g. 2 ranks x 1 accumulation step and 1
rank x 2) plans the same micro-batches j, only loaded by other ranks (``j = a * W + rank``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from anima_ft.data.sources import Bucket, Catalog


@dataclass
class MicroBatchPlan:
    """One micro-batch: ``samples[k] = (source, sample_id, epoch, position)`` of slot k, all in ``bucket``."""

    step: int
    index: int  # j = accum_index * world_size + rank
    bucket: Bucket
    samples: list[tuple[int, int, int, int]]
    drop: list[bool]


def split_counts(weights: list[float], carry: list[float], total: int) -> tuple[list[int], list[float]]:
    """Step 1 of the module docstring: ``(counts, new_carry)`` for one global batch of ``total`` samples.

    Counts never go negative (a negative target gets 0); if clamping over-allocates, the sources most over their
    target give one back. Sources with weight 0 get nothing and their carry is reset.
    """
    active = [s for s, w in enumerate(weights) if w > 0]
    targets = [carry[s] + w * total if w > 0 else 0.0 for s, w in enumerate(weights)]
    counts = [max(0, math.floor(t)) for t in targets]
    extra = total - sum(counts)
    if extra >= 0:
        order = sorted(active, key=lambda s: (-(targets[s] - counts[s]), s))
        for s in order[:extra]:
            counts[s] += 1
    else:
        order = sorted((s for s in active if counts[s] > 0), key=lambda s: (targets[s] - counts[s], s))
        for s in order[:-extra]:
            counts[s] -= 1
    return counts, [t - n for t, n in zip(targets, counts)]


class MixPlanner:
    """Stateful planner; ``next_global_batch()`` returns the W * A micro-batch plans of the next global batch."""

    def __init__(self, catalog: Catalog, weights: dict[str, float], micro_batch_size: int, grad_accum_steps: int,
                 world_size: int, seed: int, caption_dropout: float = 0.0):
        if micro_batch_size < 1 or grad_accum_steps < 1 or world_size < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size}, grad_accum_steps {grad_accum_steps} and "
                             f"world_size {world_size} must all be >= 1")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={caption_dropout} must be in [0, 1]")
        self.catalog = catalog
        self.M, self.A, self.W = micro_batch_size, grad_accum_steps, world_size
        self.seed, self.caption_dropout = seed, caption_dropout
        self.buckets = sorted({b for per in catalog.by_bucket for b in per})
        self._tags = [zlib.crc32(n.encode()) for n in catalog.names]
        self._perms: dict[tuple[int, Bucket], tuple[int, np.ndarray]] = {}
        self._cdfs: dict[tuple, np.ndarray] = {}
        self.step = 0
        self.carry = [0.0] * len(catalog.names)
        self.cursors: dict[tuple[int, Bucket], list[int]] = {}  # (source, bucket) -> [epoch, position]
        self.weights: list[float] = []
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Replace the source weights (missing names get 0); the carried error is kept."""
        self.weights = self.normalize_weights(weights)

    def normalize_weights(self, weights: dict[str, float]) -> list[float]:
        """Check ``{name: weight}`` against the catalog and return the normalized weights in source order."""
        unknown = set(weights) - set(self.catalog.names)
        if unknown:
            raise ValueError(f"weights name unknown sources {sorted(unknown)}; sources are {self.catalog.names}")
        raw = [float(weights.get(n, 0.0)) for n in self.catalog.names]
        if any(w < 0 or not math.isfinite(w) for w in raw) or sum(raw) <= 0:
            raise ValueError(f"source weights {dict(zip(self.catalog.names, raw))} must be finite, >= 0, sum > 0")
        active = [s for s, w in enumerate(raw) if w > 0]
        shared = set(self.catalog.by_bucket[active[0]]).intersection(*(self.catalog.by_bucket[s] for s in active))
        if not shared:
            raise ValueError(f"sources {[self.catalog.names[s] for s in active]} share no bucket, so no micro-batch "
                             "can hold all of them; prepare them with the same bucket settings")
        return [w / sum(raw) for w in raw]

    def order(self, source: int, bucket: Bucket, epoch: int) -> np.ndarray:
        """Sample ids of (source, bucket) in the order of ``epoch`` (a seeded permutation)."""
        cached = self._perms.get((source, bucket))
        if cached is not None and cached[0] == epoch:
            return cached[1]
        ids = np.asarray(self.catalog.by_bucket[source][bucket], dtype=np.int64)
        rng = np.random.default_rng([self.seed, 0xB0C, self._tags[source], bucket[0], bucket[1], epoch])
        perm = ids[rng.permutation(len(ids))]
        self._perms[(source, bucket)] = (epoch, perm)
        return perm

    def _at(self, source: int, bucket: Bucket, q: int) -> tuple[int, int, int, int]:
        """The slot drawn at absolute position ``q = epoch * n + position`` of the pair's stream."""
        epoch, position = divmod(q, len(self.catalog.by_bucket[source][bucket]))
        return source, int(self.order(source, bucket, epoch)[position]), epoch, position

    def following(self, source: int, bucket: Bucket, epoch: int, position: int):
        """Sample ids after ``(epoch, position)`` in the pair's order up to the end of the next epoch (so every
        sample of the pair comes up at least once); used to replace a sample that fails to decode."""
        n = len(self.catalog.by_bucket[source][bucket])
        for k in range(1, 2 * n - position):
            e, p = epoch + (position + k) // n, (position + k) % n
            yield int(self.order(source, bucket, e)[p])

    def _bucket_cdf(self, needed: frozenset[int]) -> np.ndarray:
        """Cumulative bucket probabilities for a chunk needing ``needed`` sources (step 3), cached per weights."""
        key = (needed, tuple(self.weights))
        cdf = self._cdfs.get(key)
        if cdf is None:
            by_bucket = self.catalog.by_bucket
            sizes = np.array([sum(len(per.get(b, ())) for per, w in zip(by_bucket, self.weights) if w > 0)
                              if all(b in by_bucket[s] for s in needed) else 0 for b in self.buckets], np.float64)
            cdf = np.cumsum(sizes) / sizes.sum()
            self._cdfs[key] = cdf
        return cdf

    def next_global_batch(self, materialize: Iterable[int] | None = None) -> list[MicroBatchPlan | None]:
        """Plan the next global batch (all ranks, all accumulation steps) and advance the state.

        Returns the ``A * W`` plans in micro-batch order; with ``materialize`` only those indices j get a plan (the
        others are None): the counts, buckets and cursor moves of every micro-batch are computed with array
        operations, so a rank pays per sample only for its own micro-batches, whatever the world size.
        """
        num_micro, num_sources = self.A * self.W, len(self.weights)
        counts, self.carry = split_counts(self.weights, self.carry, self.M * num_micro)
        positions = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
        sources = np.concatenate([np.full(n, s) for s, n in enumerate(counts) if n])
        labels = sources[np.lexsort((sources, positions))]  # evenly interleaved, ties to the earlier source
        chunks = labels.reshape(num_micro, self.M)
        rng = np.random.default_rng([self.seed, 0x57E9, self.step])
        chunks = chunks[rng.permutation(num_micro)]  # chunks[j]: the sources of micro-batch j's slots
        u_bucket = rng.random(num_micro)  # the caption dropout draws follow, below (only when a plan is built)
        comp = (chunks[:, :, None] == np.arange(num_sources)).sum(1)  # [num_micro, S]: slots per source
        needed = (comp > 0) @ (1 << np.arange(num_sources))  # bit mask of the sources each chunk needs
        bucket_idx = np.empty(num_micro, dtype=np.int64)
        for mask in sorted(set(needed.tolist())):  # np.unique's order, without its overhead on tiny arrays
            rows = needed == mask
            cdf = self._bucket_cdf(frozenset(s for s in range(num_sources) if mask >> s & 1))
            bucket_idx[rows] = np.minimum(np.searchsorted(cdf, u_bucket[rows], side="right"), len(cdf) - 1)
        # start[j, s]: absolute position in the (s, bucket_j) stream where chunk j's draws begin
        start = np.zeros((num_micro, num_sources), dtype=np.int64)
        for b in sorted(set(bucket_idx.tolist())):
            rows, bucket = bucket_idx == b, self.buckets[b]
            for s in range(num_sources):
                taken = comp[rows, s]
                if not taken.any():
                    continue
                cursor = self.cursors.setdefault((s, bucket), [0, 0])
                q0 = cursor[0] * len(self.catalog.by_bucket[s][bucket]) + cursor[1]
                start[rows, s] = q0 + np.cumsum(taken) - taken
                cursor[0], cursor[1] = divmod(q0 + int(taken.sum()), len(self.catalog.by_bucket[s][bucket]))
        wanted = range(num_micro) if materialize is None else list(materialize)
        plans: list[MicroBatchPlan | None] = [None] * num_micro
        if wanted:  # the last draws of this global batch's generator: skipped when only advancing the state
            drops = rng.random((num_micro, self.M)) < self.caption_dropout
        for j in wanted:
            bucket, seen = self.buckets[bucket_idx[j]], [0] * num_sources
            samples = []
            for s in chunks[j].tolist():
                samples.append(self._at(s, bucket, int(start[j, s]) + seen[s]))
                seen[s] += 1
            plans[j] = MicroBatchPlan(self.step, j, bucket, samples, drops[j].tolist())
        self.step += 1
        return plans

    def state_dict(self) -> dict:
        """JSON-friendly state: step, weights and carry by source name, and every cursor."""
        names = self.catalog.names
        return {
            "step": self.step,
            "weights": dict(zip(names, self.weights)),
            "carry": dict(zip(names, self.carry)),
            "cursors": {f"{names[s]}|{b[0]}x{b[1]}": list(c) for (s, b), c in sorted(self.cursors.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (source names must match this catalog's)."""
        names = self.catalog.names
        if set(state["weights"]) != set(names):
            raise ValueError(f"planner state is for sources {sorted(state['weights'])}, this stream has {names}")
        self.set_weights(state["weights"])
        self.weights = [float(state["weights"][n]) for n in names]  # bit-exact, not renormalized
        self.step = int(state["step"])
        self.carry = [float(state["carry"][n]) for n in names]
        self.cursors = {}
        for key, cursor in state["cursors"].items():
            name, size = key.rsplit("|", 1)
            w, h = (int(v) for v in size.split("x"))
            self.cursors[(names.index(name), (w, h))] = [int(cursor[0]), int(cursor[1])]
