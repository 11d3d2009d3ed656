"""DrivenLoop: the waiting thread runs the remote I/O loop itself; the background thread runs it otherwise."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anima_ft.data.driven_loop import DrivenLoop, driven_loop


@pytest.fixture
def dl():
    loop = DrivenLoop(grace_s=0.2)
    yield loop
    loop.close()


async def _ident_after(delay: float) -> int:
    await asyncio.sleep(delay)
    return threading.get_ident()


async def _ident_once_driven(dl: DrivenLoop) -> int:
    """The ident of the thread that runs this coroutine once a waiter has taken the loop over (not before: a
    background thread that is still running the loop when the waiter arrives would otherwise be reported, however
    short the coroutine; how long that takes is up to the scheduler of a busy machine)."""
    deadline = time.monotonic() + 10  # then report whoever runs it (a wait that never takes over fails, not hangs)
    while (dl._serving or not dl._driving) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    return threading.get_ident()


def _serving(dl: DrivenLoop, timeout: float = 5.0) -> None:
    """Wait until the background thread runs the loop."""
    deadline = time.monotonic() + timeout
    while not dl._serving:
        assert time.monotonic() < deadline, "the background thread never ran the loop"
        time.sleep(0.005)


def test_the_waiter_runs_the_loop_in_its_own_thread():
    dl = DrivenLoop(grace_s=2.0)  # long: the second wait below comes well within it, even on a busy machine
    try:
        _serving(dl, timeout=10)
        fut = asyncio.run_coroutine_threadsafe(_ident_once_driven(dl), dl.loop)
        assert dl.wait(fut) == threading.get_ident()
        assert dl.handovers == 1  # it had to stop the background thread first
        fut = asyncio.run_coroutine_threadsafe(_ident_once_driven(dl), dl.loop)
        assert dl.wait(fut) == threading.get_ident()
        assert dl.handovers == 1  # within the grace: taken back without a hand-over
    finally:
        dl.close()


def test_nobody_waiting_the_background_thread_runs_it_after_the_grace(dl):
    fut = asyncio.run_coroutine_threadsafe(_ident_after(0.0), dl.loop)
    dl.wait(fut)
    released = time.monotonic()
    fut = asyncio.run_coroutine_threadsafe(_ident_after(0.0), dl.loop)
    assert fut.result(timeout=10) == dl._thread.ident  # a plain result(): only the background thread can run it
    assert time.monotonic() - released >= 0.2 - 0.02  # not before the grace (nobody ran the loop until then)


def test_the_futures_error_is_raised_and_the_loop_handed_back(dl):
    async def fail():
        await asyncio.sleep(0.01)
        raise KeyError("bad sample")

    with pytest.raises(KeyError, match="bad sample"):
        dl.wait(asyncio.run_coroutine_threadsafe(fail(), dl.loop))
    assert not dl._driving
    assert dl.wait(asyncio.run_coroutine_threadsafe(_ident_once_driven(dl), dl.loop)) == threading.get_ident()


def test_waiting_inside_the_loop_is_refused(dl):
    async def inner():
        other = asyncio.run_coroutine_threadsafe(_ident_after(0.0), dl.loop)
        with pytest.raises(RuntimeError, match="never return"):
            dl.wait(other)
        return "refused"

    assert dl.wait(asyncio.run_coroutine_threadsafe(inner(), dl.loop)) == "refused"


@settings(max_examples=25, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 0.01), st.booleans()), min_size=1, max_size=12),
       grace=st.sampled_from([0.0, 0.001, 0.02]))
def test_any_interleaving_of_waiters_and_plain_results(jobs, grace):
    """Threads waiting (DrivenLoop.wait) or blocking on result() (as fsspec's sync does) for coroutines of random
    lengths, some failing: every one gets its own result or error, the loop is never run by two threads at once
    (asyncio would raise), and nothing hangs."""
    dl = DrivenLoop(grace_s=grace)
    results, errors = {}, []

    async def job(i, delay, fail):
        await asyncio.sleep(delay)
        if fail:
            raise ValueError(i)
        return i

    def worker(kind, i, delay, fail):
        fut = asyncio.run_coroutine_threadsafe(job(i, delay, fail), dl.loop)
        try:
            results[i] = dl.wait(fut) if kind else fut.result(timeout=30)
        except ValueError as err:
            results[i] = ("failed", err.args[0])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=worker, args=(kind % 2, i, delay, fail))
                   for i, (kind, delay, fail) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a waiter hung"
        assert errors == []
        assert results == {i: ("failed", i) if fail else i for i, (_, _, fail) in enumerate(jobs)}
    finally:
        dl.close()


def _child(queue) -> None:
    loop = driven_loop()
    fut = asyncio.run_coroutine_threadsafe(_ident_once_driven(loop), loop.loop)
    queue.put((id(loop), loop.wait(fut) == threading.get_ident()))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="fork start method only")
def test_a_forked_child_gets_its_own_loop():
    parent = driven_loop()
    assert driven_loop() is parent
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    _, ran_in_child = queue.get(timeout=30)
    proc.join(timeout=30)
    assert proc.exitcode == 0 and ran_in_child
    fut = asyncio.run_coroutine_threadsafe(_ident_once_driven(parent), parent.loop)
    assert parent.wait(fut) == threading.get_ident()  # the parent's loop still works, run by its waiter
