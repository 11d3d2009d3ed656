"""The failure a rank reports to its peers (``PeerWatchdog.report_error``, ``fail_rank``): the first one reported is
the one every rank sees, whatever the order in which later, secondary failures arrive; a rank whose own error
followed a peer's names the peer's first. Two watchdogs on a real TCPStore in this process, and ``fail_rank`` in a
child process (it ends the process)."""

from __future__ import annotations

import datetime
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from anima_ft.runtime import free_port
from anima_ft.train.distributed import PeerWatchdog


@pytest.fixture
def store_port():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    yield port
    del server


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_first_reported_failure_is_the_one_every_rank_sees(store_port, order):
    dogs = [PeerWatchdog(r, 3, 60.0, "127.0.0.1", store_port) for r in range(3)]
    try:
        first = f"rank {order[0]}: RuntimeError: failure {order[0]}"
        for r in order:
            assert dogs[r].report_error(f"RuntimeError: failure {r}") == first
        assert all(d.peer_failed() for d in dogs)
        assert dogs[0]._store.get(dogs[0]._key("error")).decode() == first
    finally:
        for d in dogs:
            d.stop()


def _fail_in_child(port: int, rank: int, error: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os
        os.environ.update(RANK="{rank}", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
        from anima_ft.train import distributed
        distributed.start_watchdog({rank}, 2, 60.0)
        distributed.fail_rank(RuntimeError({error!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_fail_rank_names_the_peer_whose_failure_came_first(store_port):
    first = _fail_in_child(store_port, 1, "injected on rank 1")
    assert first.returncode == 1 and "a peer failed" not in first.stderr
    assert "RuntimeError: injected on rank 1" in first.stderr
    second = _fail_in_child(store_port, 0, "Connection closed by peer")
    assert second.returncode == 1
    assert "a peer failed (rank 1: RuntimeError: injected on rank 1); ending this rank too" in second.stderr
    assert "RuntimeError: Connection closed by peer" in second.stderr  # its own error follows, as context
    assert second.stderr.index("a peer failed") < second.stderr.index("Connection closed by peer")
