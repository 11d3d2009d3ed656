"""SpanPrefetcher with submitted requests (Futures, as ObjectStore.submit_range makes them) and a decode step.

The reference for every span is the slice of the source bytes (and its decode computed here in the test's thread).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anima_ft.data.prefetch import SpanPrefetcher

DATA = bytes(range(256)) * 64


class BadSample(Exception):
    pass


def make(depth=3, fail=(), bad=(), decode_threads=1):
    """A prefetcher whose requests run in a thread pool via ``submit``; spans whose start is in ``fail`` fail
    when fetched as part of a longer run, and spans starting in ``bad`` fail to decode."""
    pool = ThreadPoolExecutor(4)
    calls, decoded_in = [], []

    def fetch(shard, start, end):
        calls.append(("fetch", shard, start, end))
        return DATA[start:end]

    def submit(spans):
        calls.extend(("submit", *span) for span in spans)

        def run(start, end):
            if start in fail:
                raise OSError(f"injected failure of [{start}, {end})")
            return DATA[start:end]

        return [pool.submit(run, start, end) for _, start, end in spans]

    def decode(span, tag, data):
        decoded_in.append(threading.current_thread().name)
        if span[1] in bad:
            raise BadSample(span)
        return (tag, sum(data))

    pf = SpanPrefetcher(fetch, depth=depth, max_run_bytes=300, submit=submit, decode=decode,
                        decode_threads=decode_threads)
    return pf, calls, decoded_in, pool


def test_decoded_spans_come_back_in_order_and_are_decoded_off_the_consumer_thread():
    pf, calls, decoded_in, pool = make()
    spans = [(0, i * 100, i * 100 + 100) for i in range(5)] + [(0, 40, 60), (1, 0, 10)]
    pf.schedule(spans, tags=[f"t{i}" for i in range(len(spans))])
    for i, span in enumerate(spans):
        assert pf.take(*span) == (f"t{i}", sum(DATA[span[1]:span[2]]))
        assert pf._held <= 3
    assert calls[0] == ("submit", 0, 0, 300)  # adjacent spans coalesced into one request
    assert all(c[0] == "submit" for c in calls)  # nothing fetched in the consumer's thread
    assert decoded_in and all(name.startswith("span-decode") for name in decoded_in)
    pf.close()
    pool.shutdown()


def test_decode_threads_0_decodes_in_the_consumer_thread():
    pf, calls, decoded_in, pool = make(decode_threads=0, bad={300})
    spans = [(0, i * 100, i * 100 + 100) for i in range(5)]
    pf.schedule(spans, tags=list(range(5)))
    for i, span in enumerate(spans):
        if span[1] == 300:
            with pytest.raises(BadSample):
                pf.take(*span)
        else:
            assert pf.take(*span) == (i, sum(DATA[span[1]:span[2]]))
    assert decoded_in == [threading.current_thread().name] * 5
    pf.close()
    pool.shutdown()


@pytest.mark.parametrize("decode_threads", [1, 0])
def test_a_failed_run_is_read_again_span_by_span_and_decode_errors_reach_take(decode_threads):
    pf, calls, decoded_in, pool = make(fail={0}, bad={100}, decode_threads=decode_threads)
    spans = [(0, 0, 100), (0, 100, 200), (0, 200, 300)]
    pf.schedule(spans, tags=["a", "b", "c"])
    assert pf.take(*spans[0]) == ("a", sum(DATA[0:100]))  # the run [0, 300) failed: this span re-fetched alone
    with pytest.raises(BadSample):
        pf.take(*spans[1], tag="b")  # its own fetch works, its decode fails: the consumer sees the decode error
    assert pf.take(*spans[2], tag="c") == ("c", sum(DATA[200:300]))
    assert [c for c in calls if c[0] == "fetch"] == [("fetch", 0, 0, 100), ("fetch", 0, 100, 200),
                                                    ("fetch", 0, 200, 300)]
    pf.close()
    pool.shutdown()


def test_close_cancels_requests_in_flight():
    futures = []

    def submit(spans):
        futures.extend(Future() for _ in spans)  # never completed by anyone: only close() ends them
        return futures[-len(spans):]

    pf = SpanPrefetcher(lambda *s: b"", depth=4, submit=submit, decode=lambda span, tag, data: data)
    pf.schedule([(0, i * 10, i * 10 + 5) for i in range(6)])
    assert len(futures) == 4 and pf.scheduled == 6
    pf.close()
    assert all(f.cancelled() for f in futures) and pf.scheduled == 0


def test_refills_start_in_groups_of_a_quarter_of_the_depth():
    pf, calls, _, pool = make(depth=16)
    spans = [(k, 0, 10) for k in range(40)]  # different shards: no coalescing, one request per span
    pf.schedule(spans, tags=list(range(40)))
    assert len(calls) == 16
    for k in range(3):
        pf.take(*spans[k])
        assert len(calls) == 16  # fewer free slots than a group of 4: nothing started (no event-loop wake-up)
    pf.take(*spans[3])
    assert calls[16:] == [("submit", k, 0, 10) for k in range(16, 20)]
    for span in spans[4:]:
        assert pf.take(*span)[0] == span[0]
        assert pf._held <= 16
    pf.close()
    pool.shutdown()


class _Server:
    """Requests as Futures completed by one thread in a random order after random delays (like the event loop's
    thread completing them), some failing; counts the spans in flight (``starts`` of the scheduled spans inside each
    request) and records the most ever."""

    def __init__(self, seed: int, starts: set, fail: set):
        self.rng, self.starts, self.fail = random.Random(seed), starts, fail
        self.open: list = []
        self.failed: set = set()  # (start, end) of the requests failed
        self.flying = self.peak = self.requests = 0
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, spans):
        futures = []
        with self.lock:
            for _, start, end in spans:
                n = sum(start <= s < end for s in self.starts)
                fut = Future()
                self.open.append((fut, start, end, n))
                self.flying += n
                self.requests += 1
                self.peak = max(self.peak, self.flying)
                futures.append(fut)
        return futures

    def _run(self):
        while not self.stop:
            with self.lock:
                item = self.open.pop(self.rng.randrange(len(self.open))) if self.open else None
                if item is not None:
                    self.flying -= item[3]
            if item is None:
                time.sleep(0.0005)
                continue
            time.sleep(self.rng.choice([0, 0, 0.0005, 0.002]))
            fut, start, end, _ = item
            if fut.cancelled():  # by close
                continue
            if start in self.fail:
                self.failed.add((start, end))
                fut.set_exception(OSError(f"injected failure of [{start}, {end})"))
            else:
                fut.set_result(DATA[start:end])  # the done callbacks (refills) run here, in the server's thread


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 8), in_flight_cut=st.integers(0, 7), lengths=st.lists(st.integers(1, 40), min_size=1,
       max_size=30), gaps=st.lists(st.booleans(), min_size=30, max_size=30), fails=st.sets(st.integers(0, 29),
       max_size=4), seed=st.integers(0, 2**16), decode_threads=st.sampled_from([0, 1]))
def test_any_completion_order_keeps_the_order_the_bytes_and_both_bounds(depth, in_flight_cut, lengths, gaps, fails,
                                                                        seed, decode_threads):
    """Spans (some adjacent: coalesced into runs) taken in order while a server thread completes requests in a
    random order, some failing: every take returns the exact bytes, or the request's error when its request was
    that span alone (a failed run of several is read again span by span by ``fetch``); at most ``depth`` spans are
    held and at most ``in_flight`` are in flight at any time; nothing hangs."""
    in_flight = max(1, depth - in_flight_cut)
    spans, pos = [], 0
    for length, gap in zip(lengths, gaps):
        pos += 5 if gap else 0
        spans.append((0, pos, pos + length))
        pos += length
    fail_starts = {spans[i][1] for i in fails if i < len(spans)}
    server = _Server(seed, {s[1] for s in spans}, fail_starts)
    fetched = []

    def fetch(shard, start, end):
        fetched.append((start, end))
        return DATA[start:end]

    decode = (lambda span, tag, data: (tag, bytes(data))) if decode_threads else None
    pf = SpanPrefetcher(fetch, depth=depth, max_run_bytes=64, submit=server.submit, decode=decode,
                        decode_threads=decode_threads, in_flight=in_flight)
    try:
        pf.schedule(spans, tags=list(range(len(spans))))
        for i, span in enumerate(spans):
            assert pf._held <= depth
            try:
                got = pf.take(*span)
            except OSError:
                assert span[1:] in server.failed and span[1:] not in fetched  # its own request failed: final
                continue
            want = DATA[span[1]:span[2]]
            assert got == ((i, want) if decode_threads else want)
            assert span[1:] not in server.failed
    finally:
        server.stop = True
        pf.close()
        server.thread.join(timeout=10)
    assert server.peak <= in_flight
    in_failed_runs = {s[1:] for s in spans if any(a <= s[1] < b and (a, b) != s[1:] for a, b in server.failed)}
    assert set(fetched) == in_failed_runs  # fetch read exactly the spans of the failed runs of several


def test_a_slow_request_does_not_hold_back_the_ones_behind_it():
    """in_flight < depth: with the first request held by the server, the others still complete and are replaced
    at once (by the completing thread, not by the consumer's takes) until ``depth`` spans are held."""
    futures = []

    def submit(spans):
        new = [Future() for _ in spans]
        futures.extend(new)
        return new

    spans = [(k, 0, 10) for k in range(20)]  # different shards: one request per span
    pf = SpanPrefetcher(lambda *s: b"", depth=8, in_flight=4, submit=submit)
    pf.schedule(spans)
    assert len(futures) == 4  # in_flight requests, not depth
    done = 1
    while done < len(futures):  # the server completes every request but the first, in turn
        futures[done].set_result(DATA[:10])
        done += 1
    assert len(futures) == 8 and pf._held == 8  # requests went on behind the slow first one, up to depth
    futures[0].set_result(DATA[:10])
    assert all(pf.take(*span) == DATA[:10] for span in spans[:8])
    for k, span in enumerate(spans[8:], start=8):
        assert len(futures) > k, f"request {k} was never started"
        if not futures[k].done():
            futures[k].set_result(DATA[:10])
        assert pf.take(*span) == DATA[:10]
    pf.close()


def test_in_flight_above_depth_is_refused():
    with pytest.raises(ValueError, match="in_flight=9 must be between 1 and depth=8"):
        SpanPrefetcher(lambda *s: b"", depth=8, in_flight=9)
