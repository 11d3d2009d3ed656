"""The HTTP receive path of remote shards (``ObjectStore.range_coroutine`` / ``object_store._http_range``): one
ranged GET through fsspec's HTTP session whose body is joined into a private ``bytearray``, which the reader decodes
in place (``shard_format.decode_owned``) instead of copying it once more.

Against a small Range-serving HTTP server on 127.0.0.1 (a thread in this process): the bytes equal the object's
slice; a server that ignores Range, a body cut short and a missing object are a counted ``short_read`` retry, a
counted ``short_read`` retry and a permanent ``FileNotFoundError``; and a whole stream through this path decodes
every sample in place and gives the same batches bit for bit as the same shards on local disk.
"""

from __future__ import annotations

import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from fault_proxy import assert_streams_match

from anima_ft.config.remote import RemoteConfig
from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data import sources as sources_module
from anima_ft.data.object_store import ObjectStore, RemoteReadError, _http_range

pytest.importorskip("aiohttp")
FAST = dict(retry_backoff_s=0.001, retry_backoff_max_s=0.01, request_timeout_s=10.0, max_attempts=3)


class RangeServer:
    """Serves the files of ``root`` (and ``blobs``: path -> bytes) with single-range GETs; ``mode`` misbehaves:
    ``"ignore_range"`` answers 200 with the whole object, ``"short"`` sends half the range and closes."""

    def __init__(self, root: Path | None = None, blobs: dict[str, bytes] | None = None):
        self.root, self.blobs, self.mode, self.gets = root, dict(blobs or {}), "ok", 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                data = server._object(self.path)
                server.gets += 1
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rng = self.headers.get("Range")
                if rng is None or server.mode == "ignore_range":
                    self.send_response(200)
                    body = data
                else:
                    a, b = (int(x) for x in rng.removeprefix("bytes=").split("-"))
                    body = data[a : b + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "short" and rng is not None:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_HEAD(self):
                data = server._object(self.path)
                self.send_response(404 if data is None else 200)
                self.send_header("Content-Length", str(0 if data is None else len(data)))
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _object(self, path: str) -> bytes | None:
        if path in self.blobs:
            return self.blobs[path]
        if self.root is not None:
            f = self.root / path.lstrip("/")
            if f.is_file():
                return f.read_bytes()
        return None

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


BLOB = random.Random(7).randbytes(3 << 20)  # larger than aiohttp's 64 KiB read buffer many times over


@pytest.fixture
def blob_server():
    server = RangeServer(blobs={"/blob": BLOB})
    yield server
    server.stop()


def _get(store: ObjectStore, url: str, a: int, b: int):
    (fut,) = store.submit_ranges([(url, a, b)])
    return fut.result(timeout=30)


def test_http_range_is_a_private_bytearray_of_the_exact_bytes(blob_server):
    store = ObjectStore(RemoteConfig(**FAST))
    url = f"{blob_server.url}/blob"
    fs, _ = store.filesystem(url)
    assert store.range_coroutine(fs) is _http_range
    rng = random.Random(1)
    starts = [rng.randrange(2 << 20) for _ in range(5)]
    ranges = [(0, len(BLOB)), (1, 2), (123_457, 2_900_001), *((x, x + rng.randrange(1, 1 << 20)) for x in starts)]
    for a, b in ranges:
        got = _get(store, url, a, b)
        assert type(got) is bytearray and got == BLOB[a:b], (a, b)
    io = store.counters.snapshot()
    assert (io["requests"], io["bytes"], io["retries"]) == (len(ranges), sum(b - a for a, b in ranges), 0)
    assert blob_server.gets == len(ranges)


def test_flow_control_is_lifted_for_the_body(blob_server, monkeypatch):
    """aiohttp pauses the socket whenever more than twice its 64 KiB read buffer waits unread; ``_http_range``
    lifts that limit for its one body (as aiohttp's ``read()`` does), so a 3 MB body that arrives while the event
    loop is busy elsewhere never pauses the transport. Both cases read late (the first ``readany`` waits 0.3 s)."""
    import asyncio

    from aiohttp.client_proto import ResponseHandler
    from aiohttp.streams import StreamReader
    from fsspec.asyn import sync

    pauses, late = [], set()
    real_pause, real_readany = ResponseHandler.pause_reading, StreamReader.readany

    async def late_readany(self):
        if id(self) not in late:
            late.add(id(self))
            await asyncio.sleep(0.3)
        return await real_readany(self)

    monkeypatch.setattr(ResponseHandler, "pause_reading", lambda self: pauses.append(1) or real_pause(self))
    monkeypatch.setattr(StreamReader, "readany", late_readany)
    store = ObjectStore(RemoteConfig(**FAST))
    url = f"{blob_server.url}/blob"
    fs, _ = store.filesystem(url)

    async def default_limits():
        session = await fs.set_session()
        async with session.get(url, headers={"Range": f"bytes=0-{len(BLOB) - 1}"}) as r:
            return len(await r.content.readany())

    sync(fs.loop, default_limits)
    assert pauses, "the control case pauses: aiohttp's default limit is in force without the lift"
    pauses.clear()
    assert _get(store, url, 0, len(BLOB)) == BLOB
    assert not pauses


@pytest.mark.parametrize("mode", ["ignore_range", "short"])
def test_a_wrong_length_body_is_a_counted_short_read_retry(blob_server, mode):
    store = ObjectStore(RemoteConfig(**FAST))
    blob_server.mode = mode
    with pytest.raises(RemoteReadError) as err:
        _get(store, f"{blob_server.url}/blob", 10, 100_010)
    assert ("ignores Range" if mode == "ignore_range" else "ClientPayloadError") in str(err.value)
    io = store.counters.snapshot()
    assert (io["retries"], io["retry_reasons.short_read"], io["failed_requests"], io["requests"]) == (2, 2, 1, 0)
    assert blob_server.gets == 3
    blob_server.mode = "ok"
    assert _get(store, f"{blob_server.url}/blob", 10, 100_010) == BLOB[10:100_010]


def test_a_missing_object_is_permanent_not_retried(blob_server):
    store = ObjectStore(RemoteConfig(**FAST))
    with pytest.raises(FileNotFoundError):
        _get(store, f"{blob_server.url}/nothing", 0, 10)
    assert store.counters.snapshot()["retries"] == 0 and blob_server.gets == 1


def test_stream_over_http_decodes_in_place_and_matches_local(two_sources, monkeypatch):
    target = two_sources[0]
    server = RangeServer(root=target)
    owned, copied = [], []
    real_owned, real_span = sources_module.decode_owned, sources_module.decode_span

    def spy_owned(buf, entry, qwen_dim):
        out = real_owned(buf, entry, qwen_dim)
        start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        owned.append(all(start <= out[k].data_ptr() < start + len(buf) for k in ("latent", "qwen_states", "t5_ids")))
        return out

    monkeypatch.setattr(sources_module, "decode_owned", spy_owned)
    monkeypatch.setattr(sources_module, "decode_span", lambda *a: copied.append(1) or real_span(*a))
    try:
        urls = [f"{server.url}/{t.name}" for t in sorted(target.glob("*.tar"))]
        remote = MixedStream([SourceSpec("target", urls)], micro_batch_size=2, seed=5,
                             remote=RemoteConfig(prefetch_samples=4, **FAST))
        local = MixedStream([SourceSpec("target", str(target))], micro_batch_size=2, seed=5)
        assert_streams_match(remote, local, 12)
    finally:
        server.stop()
    assert owned and all(owned) and not copied  # every remote sample decoded in its own receive buffer
    assert remote.stats()["io"]["retries"] == 0
