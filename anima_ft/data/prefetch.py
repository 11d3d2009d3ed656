"""A bounded prefetch pool for byte spans of remote shards: hides request latency, keeps memory bounded.

The consumer :meth:`~SpanPrefetcher.schedule` s the spans it will read, in order, then :meth:`~SpanPrefetcher.take`
s them in the same order. At most ``depth`` spans are held at any time: in flight, or fetched but not taken yet
(memory is about ``depth`` x the span size, whatever the shard size). At most ``in_flight`` of them (default
``depth``) are in flight: as a request finishes, the next scheduled span is started at once, without waiting for the
consumer to take the one before it. With ``in_flight < depth`` a slow request, or a consumer busy with a sample, does
not hold back the requests behind it (the pool keeps ``in_flight`` requests going, like plain concurrent GETs),
while the spans that arrived early wait in the remaining ``depth - in_flight`` slots.
Adjacent scheduled spans of one shard (``end`` of one = ``start`` of the next) are fetched as one run with one
request, up to ``max_run_bytes``. A span taken out of order (a replacement for a bad sample) is fetched directly.
The prefetcher only moves bytes: what is read is decided by the consumer, so the batches do not depend on it.

Requests are started with ``submit`` when given (a ``Future`` per request, e.g. a coroutine on the storage
library's event loop: no thread per request in flight), else ``fetch`` runs in ``depth`` threads. With ``decode``,
each span is decoded (checked and turned into tensors) by ``decode_threads`` threads as soon as its bytes arrive,
so that :meth:`take` hands over a decoded sample; with ``decode_threads=0``, :meth:`take` decodes it in the
consumer's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

Span = tuple[int, int, int]  # (shard id, start byte, end byte)
_FAILED = object()
MAX_RUN_BYTES = 16 << 20


@dataclass
class _Run:
    shard: int
    start: int
    end: int
    spans: deque = field(default_factory=deque)  # (span, tag, slot future) not yet taken, in order
    items: list = field(default_factory=list)  # all of them (the slots filled when the bytes arrive)
    future: Future | None = None  # the run's bytes
    fetch_failed: bool = False
    closed: bool = False


class SpanPrefetcher:
    """Fetch scheduled spans ahead, at most ``depth`` at a time (see the module docstring).

    fetch(shard, start, end) -> bytes does the request (with its own retries); its exceptions reach ``take``.
    submit([(shard, start, end), ...]) -> a Future of the bytes of each request, or None to read that one with
    ``fetch`` in a thread; its exceptions reach ``take`` for the spans of those requests. Once the pool is full,
    requests are started in groups of ``in_flight // 4``: by the consumer as it takes spans, and by the thread that
    completes a request (its ``Future``'s done callback) when a request slot is free.
    decode(span, tag, data) -> the object ``take`` returns for a span (``tag`` is what ``schedule`` was given with
    it); its exceptions reach ``take`` too. Without ``decode``, ``take`` returns the bytes.
    """

    def __init__(self, fetch: Callable[[int, int, int], bytes], depth: int, max_run_bytes: int = MAX_RUN_BYTES,
                 submit: Callable[[list[Span]], list[Future | None]] | None = None,
                 decode: Callable[[Span, Any, bytes], Any] | None = None, decode_threads: int = 1,
                 wait: Callable[[Future], Any] = Future.result, in_flight: int | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        in_flight = depth if in_flight is None else in_flight
        if not 1 <= in_flight <= depth:
            raise ValueError(f"prefetch in_flight={in_flight} must be between 1 and depth={depth}")
        if decode_threads < 0:
            raise ValueError(f"prefetch decode_threads={decode_threads} must be >= 0 (0: decode in take)")
        self._fetch, self.depth, self.max_run_bytes = fetch, depth, max_run_bytes
        self._submit, self._decode, self._decode_threads, self._wait = submit, decode, decode_threads, wait
        self._decode_ahead = decode is not None and decode_threads > 0
        self.in_flight = in_flight
        self._refill = max(1, in_flight // 4)
        self._queue: deque[tuple[Span, Any]] = deque()
        self._window: deque[_Run] = deque()
        self._held = 0  # spans in the window (in flight, fetched or decoded, not taken)
        self._flying = 0  # spans of requests in flight (started, not done)
        self._lock = threading.RLock()  # the consumer and the threads completing requests both start requests
        self._filling = False  # a _fill is on this thread's stack (a request done at once calls back into it)
        self._fill_again = False
        self._pool: ThreadPoolExecutor | None = None
        self._decoders: ThreadPoolExecutor | None = None

    def schedule(self, spans: Iterable[Span], tags: Iterable[Any] | None = None) -> None:
        """Append spans (each with its tag for ``decode``) to the read order and start fetching as far as the
        depth allows."""
        spans = list(spans)
        with self._lock:
            self._queue.extend(zip(spans, tags if tags is not None else [None] * len(spans), strict=True))
        self._fill()

    @property
    def scheduled(self) -> int:
        """Spans scheduled and not yet taken (waiting or held)."""
        return len(self._queue) + self._held

    def _fill(self) -> None:
        """Start requests for the next scheduled spans as far as ``depth`` and ``in_flight`` allow."""
        with self._lock:
            if self._filling:  # called back from a request that completed inside _start (same thread)
                self._fill_again = True
                return
            self._filling = True
            try:
                self._fill_again = True
                while self._fill_again:
                    self._fill_again = False
                    self._start()
            finally:
                self._filling = False

    def _start(self) -> None:
        free = min(self.depth - self._held, self.in_flight - self._flying)
        if not self._queue or free <= 0 or (self._window and free < self._refill):
            return  # refills come in groups of _refill spans: one wake-up of the event loop per group
        runs = []
        while self._queue and self._held < self.depth and self._flying < self.in_flight:
            span, tag = self._queue.popleft()
            run = _Run(*span, deque([(span, tag, Future())]))
            while (self._queue and self._queue[0][0][0] == run.shard and self._queue[0][0][1] == run.end
                   and self._held + len(run.spans) < self.depth and self._flying + len(run.spans) < self.in_flight
                   and self._queue[0][0][2] - run.start <= self.max_run_bytes):
                span, tag = self._queue.popleft()
                run.spans.append((span, tag, Future()))
                run.end = span[2]
            run.items = list(run.spans)
            self._window.append(run)
            self._held += len(run.spans)
            self._flying += len(run.items)
            runs.append(run)
        if self._decode_ahead and self._decoders is None:
            self._decoders = ThreadPoolExecutor(max_workers=self._decode_threads, thread_name_prefix="span-decode")
        try:
            submitted = (self._submit([(r.shard, r.start, r.end) for r in runs]) if self._submit is not None
                         else [None] * len(runs))
        except Exception as err:  # noqa: BLE001 - each span's take raises it
            failed = Future()
            failed.set_exception(err)
            submitted = [failed] * len(runs)
        for run, future in zip(runs, submitted, strict=True):
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="span-prefetch")
                future = self._pool.submit(self._fetch, run.shard, run.start, run.end)
            run.future = future
            future.add_done_callback(lambda fut, run=run: self._arrived(run, fut))

    def _arrived(self, run: _Run, fut: Future) -> None:
        """The run's request is done (runs in the thread that finished it): fill the span slots or start decoding,
        and start the next requests."""
        run.future = None  # no cycle run -> future -> this callback -> run: the bytes go as soon as they are used
        with self._lock:
            if run.closed:
                return
            self._flying -= len(run.items)
        try:
            self._fill_slots(run, fut)
        finally:
            if self._queue:
                self._fill()

    def _fill_slots(self, run: _Run, fut: Future) -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            run.fetch_failed = True
            for _, _, slot in run.items:
                slot.set_exception(err)
            return
        data = fut.result()
        if not self._decode_ahead:
            for span, _, slot in run.items:
                slot.set_result(self._cut(run, span, data))
            return
        try:
            self._decoders.submit(self._decode_run, run, data)
        except RuntimeError:  # closed meanwhile: nobody will take these spans
            pass

    def _decode_run(self, run: _Run, data: bytes) -> None:
        for span, tag, slot in run.items:
            if run.closed:
                return
            try:
                slot.set_result(self._decode(span, tag, self._cut(run, span, data)))
            except Exception as err:  # the consumer's error (a bad sample), raised by take
                slot.set_exception(err)

    @staticmethod
    def _cut(run: _Run, span: Span, data: bytes) -> bytes:
        if (span[1], span[2]) == (run.start, run.end):
            return data  # the whole run: no copy
        return data[span[1] - run.start : span[2] - run.start]

    def is_next(self, span: Span) -> bool:
        """Whether ``span`` is the next scheduled span (so :meth:`take` serves it from the pool)."""
        return bool(self._window and self._window[0].spans[0][0] == span) or (
            not self._window and bool(self._queue) and self._queue[0][0] == span)

    def take(self, shard: int, start: int, end: int, tag: Any = None) -> Any:
        """One span (decoded when there is ``decode``): from the head of the window when it is the next scheduled
        span, else fetched (and decoded, with ``tag``) now in this thread."""
        span = (shard, start, end)
        if not self._window and self._queue and self._queue[0][0] == span:
            self._fill()
        with self._lock:
            if not self._window or self._window[0].spans[0][0] != span:
                run = None
            else:
                run = self._window[0]
                _, held_tag, slot = run.spans.popleft()
                self._held -= 1
                if not run.spans:
                    self._window.popleft()
        if run is None:
            return self._direct(span, tag)
        try:
            out = self._wait(slot)
        except Exception:
            if not run.fetch_failed or (run.start, run.end) == (start, end):
                raise
            out = _FAILED
        finally:
            self._fill()
        if out is _FAILED:
            return self._direct(span, held_tag)  # the run's one request failed: each of its spans gets its own tries
        if self._decode is not None and not self._decode_ahead:
            return self._decode(span, held_tag, out)
        return out

    def _direct(self, span: Span, tag: Any) -> Any:
        data = self._fetch(*span)
        return data if self._decode is None else self._decode(span, tag, data)

    def close(self) -> None:
        """Drop everything scheduled and stop the threads (requests in flight are cancelled or finish unused)."""
        with self._lock:
            runs = list(self._window)
            for run in runs:
                run.closed = True
            self._queue.clear()
            self._window.clear()
            self._held = self._flying = 0
        for run in runs:
            future = run.future
            if future is not None:
                future.cancel()
        for pool in (self._pool, self._decoders):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._decoders = None
