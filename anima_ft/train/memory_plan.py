"""Memory and checkpoint-size arithmetic of a ZeRO run, term by term (the numbers in the recipes' headers).

Per rank, for ``total`` parameters of which ``trainable`` train, ``world`` data-parallel ranks, bf16 weights and
fp32 optimizer state (docs/full_size_cpu.md#plan compares every term with the measured peak at full size):

* ``weights``: 2 B x total, also under ZeRO-3. Its partitioned 2 B x total / world comes with up to
  ``stage3_max_live_parameters`` (DeepSpeed's default 1e9 elements, 2 GB of bf16) gathered during the step, and
  the trainer loads the whole file on every rank before DeepSpeed partitions it; at full size ZeRO-3 peaked at
  8.7-8.9 GiB per rank against 8.3-8.8 for ZeRO-2 (docs/full_size_cpu.md#defects; loading straight into
  partitions was tried and did not lower the peak);
* ``grads``: 2 B x trainable, the bf16 gradients backward produces before they are reduced into partitions;
* ``optimizer``: 16 B x trainable / world: fp32 master weights, Adam's two moments and the fp32 gradient
  partition of the update (ZeRO-1/2/3 all partition these);
* ``runtime``: a fixed allowance for the interpreter, torch, DeepSpeed and the activations of one
  checkpointed block (measured about 1 GiB on CPU at 256 px; see the docs page).

A checkpoint holds the module's bf16 weights once (2 B x total, trainable and frozen) and the optimizer state
(12 B x trainable: master weights and both moments).
"""

from __future__ import annotations

RUNTIME_BYTES = int(1.5 * 2**30)
"""Per-rank allowance for everything that does not scale with the parameter counts."""


def rank_memory(total: int, trainable: int, world: int, zero_stage: int, runtime: int = RUNTIME_BYTES) -> dict:
    """Bytes per rank by term plus ``total`` (see the module docstring)."""
    if world < 1 or not 0 <= trainable <= total or zero_stage not in (1, 2, 3):
        raise ValueError(f"rank_memory: need world >= 1, 0 <= trainable <= total and ZeRO stage 1-3, got "
                         f"world={world}, trainable={trainable}, total={total}, zero_stage={zero_stage}")
    terms = {"weights": 2 * total, "grads": 2 * trainable,
             "optimizer": 16 * trainable // world, "runtime": runtime}
    terms["total"] = sum(terms.values())
    return terms


def checkpoint_bytes(total: int, trainable: int) -> int:
    """Bytes of one checkpoint: bf16 module weights plus fp32 master weights and Adam moments."""
    return 2 * total + 12 * trainable
