"""SpanPrefetcher with submitted requests (Futures, as ObjectStore.submit_range makes them) and a decode step.

The reference for every span is the slice of the source bytes (and its decode computed here in the test's thread).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

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
