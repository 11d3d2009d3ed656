"""Test servers on 127.0.0.1 only: moto's S3 server (a real HTTP endpoint) and a fault-injecting HTTP proxy.

``FaultProxy`` forwards each request to the upstream server and may, per request, add latency or inject one fault:

* ``"500"``: answer ``500 InternalError`` (an S3 XML error body) instead of forwarding the answer;
* ``"503"``: answer ``503 SlowDown`` (S3 throttling);
* ``"reset"``: close the connection without an answer (RST);
* ``"truncate"``: send the real status and Content-Length but only half the body, then close;
* ``"bitflip"``: flip one bit in the middle of the body (the index checksums must catch it; never retried).

``choose(method, path, headers) -> fault or None`` decides; ``injected`` counts the faults by kind and ``log``
keeps ``(method, path, range, fault)`` of every request in arrival order. ``assert_streams_match`` compares a remote
stream with the same shards read locally, batch by batch, bit for bit.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from anima_ft.runtime import free_port

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}


class S3Server:
    """moto's S3 server on 127.0.0.1 at a free port (``start`` / ``stop``)."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> S3Server:
        """Start serving (returns self)."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (``http://127.0.0.1:PORT``) that injects faults."""

    def __init__(self, upstream: str, latency_s: float = 0.0,
                 choose: Callable[[str, str, dict], str | None] | None = None):
        self.upstream_host, self.upstream_port = upstream.rsplit("//", 1)[1].split(":")
        self.latency_s = latency_s
        self.choose = choose or (lambda method, path, headers: None)
        self.injected: Counter = Counter()
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client went away (a cancelled prefetch, exit)
                    self.close_connection = True

            def _handle(self):
                proxy._forward(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._local = threading.local()

    def start(self) -> FaultProxy:
        """Start serving (returns self)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.upstream_host, int(self.upstream_port),
                                                                 timeout=30)
        return conn

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        import time

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        with self._lock:
            fault = self.choose(h.command, h.path, headers)
            self.log.append((h.command, h.path, headers.get("Range") or headers.get("range"), fault))
            if fault:
                self.injected[fault] += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault in ("500", "503"):
            code, message = ("InternalError", "injected") if fault == "500" else ("SlowDown", "Please reduce your "
                                                                                  "request rate.")
            err = f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
            h.send_response(int(fault))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(err)))
            h.end_headers()
            h.wfile.write(err)
            return
        for attempt in range(2):
            conn = self._upstream()
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        if fault == "bitflip" and data:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x10
            data = bytes(data)
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and (k.lower() != "content-length" or h.command == "HEAD"):
                h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if fault == "truncate" and h.command == "GET" and len(data) > 1:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if h.command != "HEAD":
            h.wfile.write(data)


BATCH_TENSORS = ("latents", "qwen_states", "qwen_mask", "t5_ids", "t5_mask")


def assert_streams_match(remote, local, num_batches: int) -> None:
    """Iterate two ``MixedStream`` s side by side for ``num_batches`` micro-batches and assert identical keys,
    captions and tensors (bit for bit); both iterators are closed."""
    import torch

    a, b = iter(remote), iter(local)
    try:
        for _ in range(num_batches):
            x, y = next(a), next(b)
            assert x["key"] == y["key"] and x["caption"] == y["caption"]
            for name in BATCH_TENSORS:
                assert torch.equal(x[name], y[name]), name
    finally:
        a.close()
        b.close()

