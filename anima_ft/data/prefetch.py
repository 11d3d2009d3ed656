"""A bounded prefetch pool for byte spans of remote shards: hides request latency, keeps memory bounded.

The consumer :meth:`~SpanPrefetcher.schedule` s the spans it will read, in order, then :meth:`~SpanPrefetcher.take`
s them in the same order. At most ``depth`` spans are in flight or fetched-but-not-taken at any time (memory is
about ``depth`` x the span size, whatever the shard size); as a span is taken the next scheduled one is started.
Adjacent scheduled spans of one shard (``end`` of one = ``start`` of the next) are fetched as one run with one
request, up to ``max_run_bytes``. A span taken out of order (a replacement for a bad sample) is fetched directly.
The prefetcher only moves bytes: what is read is decided by the consumer, so the batches do not depend on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

Span = tuple[int, int, int]  # (shard id, start byte, end byte)
MAX_RUN_BYTES = 16 << 20


@dataclass
class _Run:
    shard: int
    start: int
    end: int
    spans: deque = field(default_factory=deque)  # the spans not yet taken, in order
    future: Future | None = None


class SpanPrefetcher:
    """Fetch scheduled spans ahead with ``depth`` worker threads (see the module docstring).

    fetch(shard, start, end) -> bytes does the request (with its own retries); its exceptions reach ``take``.
    """

    def __init__(self, fetch: Callable[[int, int, int], bytes], depth: int, max_run_bytes: int = MAX_RUN_BYTES):
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        self._fetch, self.depth, self.max_run_bytes = fetch, depth, max_run_bytes
        self._queue: deque[Span] = deque()
        self._window: deque[_Run] = deque()
        self._held = 0  # spans in the window (in flight or fetched, not taken)
        self._pool: ThreadPoolExecutor | None = None

    def schedule(self, spans: Iterable[Span]) -> None:
        """Append spans to the read order and start fetching as far as the depth allows."""
        self._queue.extend(spans)
        self._fill()

    @property
    def scheduled(self) -> int:
        """Spans scheduled and not yet taken (waiting or held)."""
        return len(self._queue) + self._held

    def _fill(self) -> None:
        while self._queue and self._held < self.depth:
            shard, start, end = self._queue.popleft()
            run = _Run(shard, start, end, deque([(shard, start, end)]))
            while (self._queue and self._held + len(run.spans) < self.depth and self._queue[0][0] == shard
                   and self._queue[0][1] == run.end and self._queue[0][2] - run.start <= self.max_run_bytes):
                span = self._queue.popleft()
                run.spans.append(span)
                run.end = span[2]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="span-prefetch")
            run.future = self._pool.submit(self._fetch, run.shard, run.start, run.end)
            self._window.append(run)
            self._held += len(run.spans)

    def is_next(self, span: Span) -> bool:
        """Whether ``span`` is the next scheduled span (so :meth:`take` serves it from the pool)."""
        return bool(self._window and self._window[0].spans[0] == span) or (
            not self._window and bool(self._queue) and self._queue[0] == span)

    def take(self, shard: int, start: int, end: int) -> bytes:
        """The bytes of one span: from the head of the window when it is the next scheduled span, else fetched now."""
        span = (shard, start, end)
        if not self._window and self._queue and self._queue[0] == span:
            self._fill()
        if not self._window or self._window[0].spans[0] != span:
            return self._fetch(shard, start, end)
        run = self._window[0]
        run.spans.popleft()
        self._held -= 1
        if not run.spans:
            self._window.popleft()
        try:
            data = run.future.result()
        except Exception:
            if run.start == start and run.end == end:
                raise
            data = None  # the run's one request failed: each of its spans gets its own tries
        finally:
            self._fill()
        if data is None:
            return self._fetch(shard, start, end)
        return data[start - run.start : end - run.start]

    def close(self) -> None:
        """Drop everything scheduled and stop the threads (requests in flight finish in the background)."""
        self._queue.clear()
        self._window.clear()
        self._held = 0
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
