"""Test-only fault injection and sample tracing for the training loop, applied by wrapping the data iterator.

Nothing here runs in a normal training run: :func:`instrument` returns the iterator unchanged unless one of the
environment variables below is set, so the loop itself carries no test hooks.

* ``ANIMA_FT_FAULT=kill:STEP:RANK``  SIGKILL rank RANK when it draws a micro-batch of (0-based) step STEP;
  ``signal:STEP:RANK`` sends it SIGUSR1 (a preemption notice) instead; ``nan:FIRST[-LAST]`` makes the latents of
  every rank NaN in steps FIRST..LAST.
* ``ANIMA_FT_TRACE_KEYS=DIR``  appends ``{"step": STEP + 1, "index": j, "keys": [...]}`` per micro-batch to
  ``DIR/rank_XXXXX.jsonl`` (``j`` = the micro-batch's place in the global batch), to check the global sample order.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

FAULT_ENV = "ANIMA_FT_FAULT"
TRACE_ENV = "ANIMA_FT_TRACE_KEYS"


def _apply_fault(spec: str, step: int, rank: int, batch: dict) -> None:
    kind, at, *rest = spec.split(":")
    first, _, last = at.partition("-")
    if not int(first) <= step <= int(last or first):
        return
    if kind == "kill" and int(rest[0]) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "signal" and int(rest[0]) == rank:
        os.kill(os.getpid(), signal.SIGUSR1)
    elif kind == "nan":
        batch["latents"] = batch["latents"] * float("nan")


def instrument(batches: Iterator[dict], start_step: int, grad_accum_steps: int, rank: int,
               world_size: int) -> Iterator[dict]:
    """``batches`` as the loop will consume them (``grad_accum_steps`` per optimizer step from ``start_step``), with
    the faults and traces the environment asks for; the iterator itself when it asks for none."""
    spec, trace_dir = os.environ.get(FAULT_ENV, ""), os.environ.get(TRACE_ENV, "")
    if not spec and not trace_dir:
        return batches

    def wrapped() -> Iterator[dict]:
        for n, batch in enumerate(batches):
            step, micro = start_step + n // grad_accum_steps, n % grad_accum_steps
            if spec:
                _apply_fault(spec, step, rank, batch)
            if trace_dir:
                row = {"step": step + 1, "index": micro * world_size + rank, "keys": list(batch["key"])}
                with open(Path(trace_dir) / f"rank_{rank:05d}.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            yield batch

    return wrapped()
