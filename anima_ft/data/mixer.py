"""``MixedStream``: the streaming target/replay mixer the trainer iterates, one micro-batch per ``next``.

Each rank builds the same catalog and planner (``plan.py``) and takes micro-batches ``j = a * W + rank`` of every
global batch. With ``num_workers = n > 0`` a torch ``DataLoader`` runs n workers; worker k loads this rank's
micro-batches ``i`` with ``i % n == k`` and the DataLoader returns them round-robin, so the sequence of batches is
the same for every worker count; a worker hands each batch over through a ring of shared-memory slots
(``worker_transport.py``). The main process advances its own copy of the planner as batches are consumed, so
``state_dict()`` is exact at every micro-step; prefetched batches are simply dropped on resume or reweighting.

Remote shards (URLs, ``object_store.py``): each consumer plans ahead until ``remote.prefetch_samples`` of its
samples are scheduled and hands their byte spans to its reader's prefetch pool (``prefetch.py``), so ranged GETs
overlap decoding. Planning ahead changes nothing that is read: plans are a pure function of the planner state, and
samples are decoded in the same order as without prefetching, so the batches are bit for bit those of the same
shards on local disk. Remote I/O counters (requests, bytes, retries by reason, failed requests, cache hits) travel
with each batch and add up in ``stats()["io"]``.

Batch (the batch contract): ``latents`` bf16 [B,16,h,w]; ``qwen_states`` bf16 [B,S,C] zero-padded to the batch max S
(at least 1); ``qwen_mask`` bool [B,S]; ``t5_ids`` long [B,L] padded with 0; ``t5_mask`` bool [B,L]; ``source``
(names), ``source_id`` long [B]; ``caption``; ``key``. A caption-dropped sample follows the empty-caption
convention (docs/model.md#empty-caption): Qwen mask all False with zero states, T5 ids ``[1, 0, ...]`` with mask
``[1, 0, ...]``, caption "".
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, deque

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from anima_ft.config.remote import RemoteConfig
from anima_ft.data.object_store import io_summary, redact
from anima_ft.data.plan import MicroBatchPlan, MixPlanner
from anima_ft.data.shard_format import SampleError
from anima_ft.data.sources import Catalog, ShardReader, SourceSpec, build_catalog
from anima_ft.data.worker_transport import RingReceiver, RingSender

log = logging.getLogger(__name__)
T5_EOS = 1


def collate(samples: list[dict], drop: list[bool], source_ids: list[int], names: list[str]) -> dict:
    """Stack decoded samples of one bucket into a batch-contract dict (see the module docstring).

    One sample that is not caption-dropped needs no padding: its latent and Qwen states are returned as views
    ``[1, ...]`` of the decoded tensors (which nothing else holds), the same values, dtypes and shapes as the
    stacking below; only the T5 ids are converted (int32 -> long)."""
    B = len(samples)
    if B == 1 and not drop[0] and samples[0]["qwen_states"].shape[0] and samples[0]["t5_ids"].shape[0]:
        sample = samples[0]
        (S, _), L = sample["qwen_states"].shape, sample["t5_ids"].shape[0]
        return {
            "latents": sample["latent"].unsqueeze(0),
            "qwen_states": sample["qwen_states"].unsqueeze(0),
            "qwen_mask": torch.ones(1, S, dtype=torch.bool),
            "t5_ids": sample["t5_ids"].to(torch.long).unsqueeze(0),
            "t5_mask": torch.ones(1, L, dtype=torch.bool),
            "source": [names[source_ids[0]]],
            "source_id": torch.tensor(source_ids, dtype=torch.long),
            "caption": [sample["meta"]["caption"]],
            "key": [sample["key"]],
        }
    s_len = max([1] + [0 if d else s["qwen_states"].shape[0] for s, d in zip(samples, drop)])
    t_len = max([1] + [0 if d else s["t5_ids"].shape[0] for s, d in zip(samples, drop)])
    C = samples[0]["qwen_states"].shape[1]
    qwen_B_S_C = torch.zeros(B, s_len, C, dtype=torch.bfloat16)
    qwen_mask = torch.zeros(B, s_len, dtype=torch.bool)
    t5_B_L = torch.zeros(B, t_len, dtype=torch.long)
    t5_mask = torch.zeros(B, t_len, dtype=torch.bool)
    for b, (sample, dropped) in enumerate(zip(samples, drop)):
        if dropped:  # docs/model.md#empty-caption: empty caption = no Qwen tokens, T5 = [</s>]
            t5_B_L[b, 0], t5_mask[b, 0] = T5_EOS, True
            continue
        S, L = sample["qwen_states"].shape[0], sample["t5_ids"].shape[0]
        qwen_B_S_C[b, :S] = sample["qwen_states"]
        qwen_mask[b, :S] = True
        t5_B_L[b, :L] = sample["t5_ids"]
        t5_mask[b, :L] = True
    return {
        "latents": torch.stack([s["latent"] for s in samples]),
        "qwen_states": qwen_B_S_C,
        "qwen_mask": qwen_mask,
        "t5_ids": t5_B_L,
        "t5_mask": t5_mask,
        "source": [names[s] for s in source_ids],
        "source_id": torch.tensor(source_ids, dtype=torch.long),
        "caption": ["" if d else s["meta"]["caption"] for s, d in zip(samples, drop)],
        "key": [s["key"] for s in samples],
    }


class _RankStream(IterableDataset):
    """This rank's micro-batches from a planner state; split across DataLoader workers by micro-batch index."""

    def __init__(self, catalog: Catalog, planner_args: dict, planner_state: dict, micro: int, rank: int,
                 remote: RemoteConfig | None = None):
        self.catalog, self.planner_args, self.planner_state = catalog, planner_args, planner_state
        self.micro, self.rank, self.remote = micro, rank, remote
        # in the consumer's process (num_workers 0): planner state after each global batch planned, by step, for
        # MixedStream to take instead of planning the batch a second time (None: not recorded)
        self.states: dict[int, tuple[list[float], dict]] | None = None

    def _plans(self, planner: MixPlanner, worker: int, num_workers: int):
        """This worker's micro-batch plans, in the order it loads them (endless)."""
        i, skip = 0, self.micro
        while True:
            mine = []  # indices j of this worker's share of this rank's micro-batches, in accumulation order
            for a in range(skip, planner.A):
                if i % num_workers == worker:
                    mine.append(a * planner.W + self.rank)
                i += 1
            plans = planner.next_global_batch(materialize=mine)
            if self.states is not None:  # copies: this planner keeps moving its cursors in place
                self.states[planner.step] = (list(planner.carry), {k: list(v) for k, v in planner.cursors.items()})
            yield from (plans[j] for j in mine)
            skip = 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        planner = MixPlanner(self.catalog, **self.planner_args)
        planner.load_state_dict(self.planner_state)
        reader = ShardReader(self.catalog, remote=self.remote)
        remote = any(reader.is_remote(k) for k in range(len(self.catalog.shard_paths)))
        plans, ahead = self._plans(planner, worker, num_workers), deque()
        hand_over = RingSender().send if info is not None else (lambda batch: batch)
        try:
            while True:
                # remote shards: plan ahead so that the pool always has prefetch_samples spans to fetch
                depth = reader.remote.prefetch_samples
                while not ahead or (remote and reader.scheduled < depth and len(ahead) < depth):
                    plan = next(plans)
                    ahead.append(plan)
                    if remote:
                        reader.schedule([sample_id for _, sample_id, _, _ in plan.samples])
                yield hand_over(self._load(ahead.popleft(), planner, reader))
        finally:
            reader.close()

    def _load(self, plan: MicroBatchPlan, planner: MixPlanner, reader: ShardReader) -> dict:
        samples, skips = [], Counter()
        for source, sample_id, epoch, position in plan.samples:
            candidates = itertools.chain([sample_id], planner.following(source, plan.bucket, epoch, position))
            for k, candidate in enumerate(candidates):
                try:
                    sample = reader.read(candidate)
                except SampleError as err:
                    entry = self.catalog.entry(candidate)
                    skips[err.reason] += 1
                    log.warning("skipping sample %s in shard %s: %s", entry["key"],
                                redact(self.catalog.shard_paths[entry["shard"]]), err)
                    continue
                sample["key"] = self.catalog.keys[candidate]
                if k > 0:
                    skips["replaced"] += 1
                samples.append(sample)
                break
            else:  # nothing usable is left in this (source, bucket): a data error, named, not a crash
                shards = sorted({redact(self.catalog.shard_paths[self.catalog.entry(c)["shard"]])
                                 for c in self.catalog.by_bucket[source][plan.bucket]})
                raise ValueError(f"source {self.catalog.names[source]!r} bucket {plan.bucket}: every sample failed "
                                 f"to read ({dict(skips)}) in shards {shards[:5]}; find the damage with `anima-ft "
                                 "verify`, then copy the shards again or re-run prepare")
        batch = collate(samples, plan.drop, [s for s, *_ in plan.samples], self.catalog.names)
        batch["_skips"] = dict(skips)
        batch["_io"] = reader.io_delta()
        return batch


class MixedStream:
    """Infinite, exactly mixed, exactly resumable stream of micro-batches for one data-parallel rank.

    sources: the named sources and their weights (normalized; the replay share of every global batch of
        ``B = micro_batch_size * grad_accum_steps * dp_world_size`` samples is within one of ``f * B``, exact when
        ``f * B`` is an integer, with the error carried so the long-run share is exactly f).
    caption_dropout: probability that a sample gets the empty caption (drawn from the seed, identical on resume).
    expected_fingerprint: None, a fingerprint hash or a fingerprint dict that every shard must carry.
    validate: "index" (cheap checks at start) or "full" (decode every sample at start); see ``sources.py``.
    remote: prefetch, retry and cache settings for shards named by URL (``data.remote``; None = the defaults).

    Keep one live iterator per stream: every ``iter(stream)`` continues from the stream's current state.
    """

    def __init__(self, sources: list[SourceSpec], micro_batch_size: int, grad_accum_steps: int = 1, dp_rank: int = 0,
                 dp_world_size: int = 1, num_workers: int = 0, seed: int = 0, caption_dropout: float = 0.0,
                 expected_fingerprint=None, validate: str = "index", remote: RemoteConfig | None = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_world_size={dp_world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.remote = remote or RemoteConfig()
        self.catalog = build_catalog(sources, expected_fingerprint, validate, self.remote)
        self.rank, self.num_workers = dp_rank, num_workers
        self._planner_args = {"micro_batch_size": micro_batch_size, "grad_accum_steps": grad_accum_steps,
                              "world_size": dp_world_size, "seed": seed, "caption_dropout": caption_dropout}
        self._planner = MixPlanner(self.catalog, {s.name: s.weight for s in sources}, **self._planner_args)
        self._micro = 0  # micro-batches of the current global batch already consumed by this rank
        self._ahead: dict | None = None  # the live in-process _RankStream's planner states (see _RankStream.states)
        self._pending: dict[str, float] | None = None
        self._generation = 0  # bumped when the state changes outside the normal flow: live iterators restart
        self._seen = Counter()
        self._skipped = Counter(self.catalog.skipped)
        self._io = Counter(self.catalog.build_io)  # remote I/O of this process and its workers (not in the state)

    @property
    def fingerprint(self) -> dict:
        """The encoder fingerprint shared by every shard."""
        return self.catalog.fingerprint

    def _open(self):
        planner_args = {**self._planner_args, "weights": dict(zip(self.catalog.names, self._planner.weights))}
        dataset = _RankStream(self.catalog, planner_args, self._planner.state_dict(), self._micro, self.rank,
                              self.remote)
        self._ahead = None
        if self.num_workers == 0:
            dataset.states = self._ahead = {}
            return iter(dataset)
        return map(RingReceiver().receive, DataLoader(dataset, batch_size=None, num_workers=self.num_workers))

    def _consumed(self, batch: dict) -> None:
        self._skipped.update(batch.pop("_skips"))
        self._io.update(batch.pop("_io"))
        self._seen.update(batch["source"])
        self._micro += 1
        if self._micro == self._planner.A:
            planned = self._ahead.pop(self._planner.step + 1, None) if self._ahead is not None else None
            if planned is None:
                self._planner.next_global_batch(materialize=())  # advance only: the batches came from _RankStream
            else:  # the in-process _RankStream planned this global batch from this same state: take the result
                self._planner.carry, self._planner.cursors = planned
                self._planner.step += 1
            self._micro = 0
            if self._pending is not None:
                self._planner.set_weights(self._pending)
                self._pending = None
                self._generation += 1

    def __iter__(self):
        while True:
            generation = self._generation
            batches = self._open()
            for batch in batches:
                self._consumed(batch)
                yield batch
                if generation != self._generation:
                    break
            del batches  # shuts DataLoader workers down before new ones start

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the source weights from the next global batch on (now, if between global batches)."""
        self._planner.normalize_weights(weights)  # validate now, not at the boundary
        if self._micro == 0:
            self._planner.set_weights(weights)
            self._generation += 1
        else:
            self._pending = dict(weights)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly here: planner state, micro offset, pending weights, counters."""
        return {
            "planner": self._planner.state_dict(),
            "micro": self._micro,
            "pending_weights": self._pending,
            "layout": self._layout(),
            "seen": dict(self._seen),
            "skipped": dict(self._skipped),
        }

    def _layout(self) -> dict:
        return {**self._planner_args, "sources": self.catalog.names, "dp_rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` output; live iterators restart from the loaded position.

        With the saved layout the stream continues exactly, mid global batch included. Another layout (world
        size, rank, accumulation, micro-batch size, caption dropout) is accepted at a global-batch boundary only,
        see :meth:`load_state_dicts`.
        """
        if state["layout"] != self._layout():
            self._check_layout_change(state)
        self._planner.load_state_dict(state["planner"])
        self._micro = int(state["micro"])
        self._pending = state["pending_weights"]
        self._seen, self._skipped = Counter(state["seen"]), Counter(state["skipped"])
        self._generation += 1

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from every rank's :meth:`state_dict` of a run with another data-parallel layout.

        The planner state (step, weights, carried error, per (source, bucket) cursors) is global and identical on
        every saved rank, so it carries over as is: each (source, bucket) stream continues at its cursor (no sample
        repeated or skipped within an epoch) and the mix stays exact. The global batches are those of an
        uninterrupted run when ``micro_batch_size`` and ``grad_accum_steps x world_size`` are unchanged; otherwise
        they are planned for the new shape from the same position. Per-rank counters (``seen``, ``skipped``) are
        summed onto rank 0.
        """
        first = states[0]
        for i, state in enumerate(states[1:], start=1):
            if (state["planner"], state["micro"], state["pending_weights"]) != (
                    first["planner"], first["micro"], first["pending_weights"]):
                raise ValueError(f"saved rank {i}'s data-stream position differs from rank 0's; the checkpoint is "
                                 "inconsistent")
        merged = {**first, "seen": Counter(), "skipped": Counter(self.catalog.skipped)}
        if self.rank == 0:  # validation-time skips are counted once per rank at construction: keep them once
            for state in states:
                merged["seen"].update(state["seen"])
                merged["skipped"].update(Counter(state["skipped"]) - Counter(self.catalog.skipped))
        self.load_state_dict(merged)

    def _check_layout_change(self, state: dict) -> None:
        """Refuse a layout change where continuing would repeat or skip samples; log what stays exact."""
        old, new = state["layout"], self._layout()
        if old["sources"] != new["sources"]:
            raise ValueError(f"data state is for sources {old['sources']}, this stream has {new['sources']}")
        if old["seed"] != new["seed"]:
            raise ValueError(f"data state was saved with run.seed={old['seed']}, now {new['seed']}: the per-epoch "
                             "orders would change mid-epoch (samples repeated and skipped); resume with the saved seed")
        if state["micro"] != 0:
            raise ValueError(f"data state was saved inside a global batch (micro-batch {state['micro']} of "
                             f"{old['grad_accum_steps']}) and the layout changed {old} -> {new}; resume with the "
                             "saved layout")
        old_shape = (old["micro_batch_size"], old["grad_accum_steps"] * old["world_size"])
        new_shape = (new["micro_batch_size"], new["grad_accum_steps"] * new["world_size"])
        if old_shape == new_shape:
            log.info("data: layout %s -> %s keeps micro_batch_size and grad_accum_steps x world_size, so the global "
                     "batches continue exactly as in an uninterrupted run", old, new)
        else:
            log.warning("data: layout %s -> %s changes the shape of the global batch (micro_batch_size %d -> %d, "
                        "micro-batches per global batch %d -> %d): the mix stays exact and every (source, bucket) "
                        "stream continues at its position (no sample repeated or skipped), but global batches are "
                        "planned for the new shape and differ from an uninterrupted run", old, new, old_shape[0],
                        new_shape[0], old_shape[1], new_shape[1])

    def stats(self) -> dict:
        """``{"skipped": {reason: count}, "seen": {source: samples on this rank}, "global_step", "micro_step",
        "io": remote I/O counters}``; ``io`` (``object_store.io_summary``) counts the batches delivered so far,
        prefetched ones included, and is not saved in ``state_dict``."""
        return {"skipped": dict(self._skipped), "seen": {n: self._seen.get(n, 0) for n in self.catalog.names},
                "global_step": self._planner.step, "micro_step": self._micro, "io": io_summary(self._io)}
