"""One asyncio event loop per process for remote I/O, run by whichever thread is waiting for it.

The remote filesystems (:mod:`anima_ft.data.object_store`) do their requests on this loop. A thread in
:meth:`DrivenLoop.wait` runs the loop itself until the future it waits for is done: the loader's consumer, waiting
for its next sample, receives every body that arrives meanwhile and then checks and decodes its own sample in the
same thread, with no hand-over between threads and no other Python thread competing for the GIL. When nobody has
waited for ``GRACE_S``, a background thread runs the loop instead, so that requests go on while the consumer is
away (a training step, an evaluation, a checkpoint) and sockets are drained and timers fire as usual. The grace
keeps the background thread out of the short gaps between two samples; taking the loop back from it costs one
hand-over (a ``stop`` scheduled on the loop, then a condition variable).

Only one thread runs the loop at a time; a second waiter blocks until the first is done, then runs it if its own
future is not done yet. ``fsspec``'s ``sync`` keeps working from any thread but the one running the loop (its
coroutines run whoever runs the loop). A forked process gets its own loop (:func:`driven_loop`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

GRACE_S = 0.02  # how long the loop stays with the last waiter before the background thread runs it


class DrivenLoop:
    """An event loop that :meth:`wait` runs in the waiting thread and a background thread runs otherwise."""

    def __init__(self, grace_s: float = GRACE_S):
        self.loop = asyncio.new_event_loop()
        self.grace_s = grace_s
        self._cond = threading.Condition()
        self._drive = threading.Lock()  # held by the waiter that runs the loop
        self._serving = False  # the background thread is inside run_forever
        self._driving = False  # a waiter runs the loop (or is about to)
        self._released_at = 0.0
        self._closed = False
        self.handovers = 0  # times a waiter had to stop the background thread first
        self._thread = threading.Thread(target=self._serve, name="remote-io", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._driving:
                        self._cond.wait()
                        continue
                    left = self.grace_s - (time.monotonic() - self._released_at)
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._serving = True
            try:
                self.loop.run_forever()  # until a waiter (or close) schedules loop.stop
            finally:
                with self._cond:
                    self._serving = False
                    self._cond.notify_all()

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def wait(self, fut: Future) -> Any:
        """``fut.result()``, running the loop in this thread until ``fut`` is done."""
        if fut.done():
            return fut.result()
        if self._in_loop():
            raise RuntimeError("DrivenLoop.wait called from a callback of the loop itself: it would never return")
        with self._drive:
            if not fut.done():
                self._take_over()
                try:
                    self.loop.run_until_complete(asyncio.wrap_future(fut, loop=self.loop))
                except Exception:
                    if not fut.done():  # not the future's own error (that one is raised below)
                        raise
                finally:
                    self._hand_back()
        return fut.result(timeout=0)

    def _take_over(self) -> None:
        with self._cond:
            self._driving = True
            if self._serving:
                self.handovers += 1
                self.loop.call_soon_threadsafe(self.loop.stop)
                while self._serving:
                    self._cond.wait()

    def _hand_back(self) -> None:
        with self._cond:
            self._driving = False
            self._released_at = time.monotonic()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the background thread (tests; the process's loop lives as long as the process)."""
        with self._cond:
            self._closed = True
            if self._serving:
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._cond.notify_all()
        self._thread.join(timeout=10)


_LOOP: tuple[int, DrivenLoop] | None = None
_LOCK = threading.Lock()


def driven_loop() -> DrivenLoop:
    """This process's loop (made on first use, and again in a forked child)."""
    global _LOOP
    with _LOCK:
        if _LOOP is None or _LOOP[0] != os.getpid():
            _LOOP = (os.getpid(), DrivenLoop())
        return _LOOP[1]
