"""Shards named by URL (``s3://``, ``gs://``, ``https://``): one process's access to object storage through fsspec.

Every request goes through :meth:`ObjectStore._call`, which retries transient errors and counts them:

* **transient** (retried with exponential backoff and +-50% jitter, ``data.remote.max_attempts`` tries in all):
  5xx answers and throttling (``SlowDown``, 429), connection resets and refusals, timeouts, truncated bodies
  (a ranged read that returns fewer bytes than asked is ``short_read``), and any other error raised by the storage
  stack (aiohttp, botocore, s3fs, gcsfs) that is not one of the permanent ones;
* **permanent** (raised at once): missing objects (``FileNotFoundError``), denied access (``PermissionError``) and
  other 4xx answers.

The library's own retries are turned off (botocore ``total_max_attempts=1``, s3fs ``retries=1``, and aiohttp's
silent second try of an idempotent request whose keep-alive connection was reset, RFC 9112 9.3.1) so that every
failed HTTP request is seen, retried and counted here exactly once.

Ranged reads on asynchronous filesystems (s3fs, gcsfs, HTTP) can be started without a thread per request
(:meth:`ObjectStore.submit_ranges`): each request and its retries run as one coroutine on the filesystem's event
loop, and the caller gets a ``concurrent.futures.Future`` (on HTTP filesystems, of a ``bytearray`` that nothing else
holds, which the sample decoder uses in place: :meth:`ObjectStore.range_coroutine`). A request that still fails is a
:class:`RemoteReadError`; a bucket (or host) whose requests fail ``unreachable_after_failures`` times in a row,
with no success in between, is :class:`StorageUnreachable` (a ``RuntimeError`` naming it).

Credentials and endpoints come only from the storage library's standard environment and config files (for S3:
``AWS_ACCESS_KEY_ID`` ..., ``AWS_ENDPOINT_URL``, ``~/.aws``); nothing here reads or logs them, and URLs are
logged without user info or query strings (:func:`redact`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from anima_ft.config.remote import RemoteConfig
from anima_ft.data.driven_loop import driven_loop

log = logging.getLogger(__name__)
GLOB_CHARS = "*?["
_STACK_MODULES = ("aiohttp", "botocore", "aiobotocore", "s3fs", "gcsfs", "fsspec", "urllib3", "requests", "google")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_URL_USERINFO = re.compile(r"(\w+://)[^/@\s'\"]*@")
_URL_QUERY = re.compile(r"(\w+://[^\s'\"?]*)\?[^\s'\"]*")


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` paths other than ``file://`` (those are read through fsspec)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def redact(text: Any) -> str:
    """``text`` with every URL's user info and query string removed (a presigned URL's signature, a password)."""
    return _URL_QUERY.sub(r"\1?<redacted>", _URL_USERINFO.sub(r"\1", str(text)))


def location(url: str) -> str:
    """The bucket (``s3://bucket``) or host (``https://host:port``) of a URL: the unit that becomes unreachable."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def _checked(out: Any, expect_len: int | None) -> Any:
    if expect_len is not None and len(out) != expect_len:
        raise ShortRead(f"got {len(out)} of {expect_len} bytes")
    return out


async def _http_client(**kwargs):
    """fsspec's HTTP session factory: an aiohttp session without its silent second try of a request whose reused
    keep-alive connection was reset (``ObjectStore._call`` retries and counts it instead)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=kwargs.pop("limit", 100))
    session = aiohttp.ClientSession(connector=connector, **kwargs)
    _no_silent_retry(session)
    return session


async def _http_range(fs, url: str, start: int, end: int) -> bytearray:
    """Bytes ``[start, end)`` of ``url`` with one ranged GET on the session of fsspec's HTTP filesystem ``fs``: the
    request, status handling and reads of ``fs._cat_file``, but the body's chunks are joined into a new
    ``bytearray`` (nobody else holds it, so the sample decoder uses it in place instead of copying it once more).
    Flow control is lifted for this one body, as ``aiohttp``'s ``read()`` does. A shorter body is returned as it is
    (the caller's length check makes it a transient ``short_read``); a longer one (a server that ignores Range) is
    a ``ShortRead`` as soon as it passes the range's length, so it is never read whole into memory."""
    kw = dict(fs.kwargs)
    headers = {**kw.pop("headers", {}), "Range": f"bytes={start}-{end - 1}"}
    want, got = end - start, 0
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
        fs._raise_not_found_for_status(r, url)
        content, blocks = r.content, []
        content.set_read_chunk_size(want)
        while block := await content.readany():
            got += len(block)
            if got > want:
                raise ShortRead(f"the server sent more than the {want} bytes of the range asked for (status "
                                f"{r.status}): it ignores Range")
            blocks.append(block)
    return bytearray().join(blocks)


def _no_silent_retry(session) -> None:
    """Turn off aiohttp's retry of an idempotent request on a reset keep-alive connection (RFC 9112 9.3.1): it
    happens below every counter. aiohttp has no public switch; its own test client sets the same attribute."""
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError(f"aiohttp {__import__('aiohttp').__version__} has no ClientSession._retry_connection, so "
                           "its silent retries could not be counted; use an aiohttp 3.x that has it (tested: 3.14)")
    session._retry_connection = False


@functools.cache
def _botocore_session_class():
    """aiobotocore's aiohttp session class, with aiohttp's silent retry off (see :func:`_no_silent_retry`)."""
    from aiobotocore.httpsession import AIOHTTPSession

    class CountedRetriesSession(AIOHTTPSession):
        async def _get_session(self, proxy_url):
            session = await super()._get_session(proxy_url)
            _no_silent_retry(session)
            return session

    return CountedRetriesSession


def _start_all(loop: asyncio.AbstractEventLoop, batch: list[tuple[Future, Awaitable]]) -> None:
    """On ``loop``: run each coroutine as a task whose outcome goes to its ``concurrent.futures.Future`` (which
    stays pending, so cancellable, until then; cancelling it cancels the task)."""
    for fut, coro in batch:
        if fut.cancelled():
            coro.close()
            continue
        task = loop.create_task(coro)
        task.add_done_callback(lambda t, f=fut: _settle(f, t))
        fut.add_done_callback(lambda f, t=task: f.cancelled() and loop.call_soon_threadsafe(t.cancel))


def _settle(fut: Future, task: asyncio.Task) -> None:
    if not fut.set_running_or_notify_cancel():  # cancelled by the caller meanwhile
        return
    if task.cancelled():
        fut.set_exception(CancelledError(f"request task {task.get_name()} was cancelled"))
    elif task.exception() is not None:
        fut.set_exception(task.exception())
    else:
        fut.set_result(task.result())


class ShortRead(OSError):
    """A ranged read returned fewer bytes than asked (a truncated body), or more (a server that ignored Range):
    transient."""


class RemoteReadError(OSError):
    """One request that still failed after all its tries."""


class StorageUnreachable(RuntimeError):
    """A bucket or host whose requests keep failing: training cannot go on with this source."""


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (raised by the storage stack) is worth another try (module docstring)."""
    if isinstance(err, (_PERMANENT, RemoteReadError)):
        return False
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False
    if isinstance(err, (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    return type(err).__module__.split(".")[0] in _STACK_MODULES


def _reason(err: BaseException) -> str:
    if isinstance(err, ShortRead) or type(err).__name__ == "ClientPayloadError":  # aiohttp: body ended early
        return "short_read"
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)) or "timeout" in type(err).__name__.lower():
        return "timeout"
    text = str(err)
    if "SlowDown" in text or "429" in text or "reduce your request rate" in text:
        return "throttled"
    if isinstance(err, ConnectionError) or "connect" in type(err).__name__.lower() or "reset" in text.lower():
        return "connection"
    return "server_error" if isinstance(err, OSError) else type(err).__name__


class IOCounters:
    """Thread-safe counters of one process's remote I/O (``MixedStream.stats()["io"]``).

    requests / bytes: successful requests and the bytes they returned; retries: failed tries that were retried,
    by reason in ``retry_reasons``; failed_requests: requests that failed after every try; cache_hits: sample
    reads served from the local shard cache; cache_fills: shards copied into it.
    """

    KEYS = ("requests", "bytes", "retries", "failed_requests", "cache_hits", "cache_fills")

    def __init__(self):
        self._lock = threading.Lock()
        self.totals: Counter = Counter()
        self._sent: Counter = Counter()

    def add(self, **counts: int) -> None:
        """Add to the named counters (``retry_reasons.X`` keys included)."""
        with self._lock:
            self.totals.update(counts)

    def snapshot(self) -> Counter:
        """A copy of the totals."""
        with self._lock:
            return Counter(self.totals)

    def delta(self) -> dict[str, int]:
        """The counts added since the last call (shipped with each batch from loader workers)."""
        with self._lock:
            out = self.totals - self._sent
            self._sent = Counter(self.totals)
        return dict(out)


def io_summary(counts: Counter | dict) -> dict:
    """Flat counter dict -> ``{"requests", "bytes", "retries", "failed_requests", "cache_hits", "cache_fills",
    "retry_reasons": {reason: n}}``."""
    out = {k: int(counts.get(k, 0)) for k in IOCounters.KEYS}
    out["retry_reasons"] = {k.split(".", 1)[1]: int(v) for k, v in sorted(counts.items())
                            if k.startswith("retry_reasons.") and v}
    return out


class ObjectStore:
    """fsspec filesystems (one per protocol, created lazily in each process) plus retries, counters and the
    unreachable-bucket rule of the module docstring."""

    def __init__(self, options: RemoteConfig | None = None, sleep: Callable[[float], None] = time.sleep):
        self.options = options or RemoteConfig()
        self.counters = IOCounters()
        self._sleep = sleep
        self._pid: int | None = None
        self._fs: dict[str, Any] = {}
        self._failures: Counter = Counter()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"options": self.options, "_sleep": self._sleep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"], state["_sleep"])

    def filesystem(self, url: str) -> tuple[Any, str]:
        """``(fsspec filesystem, path inside it)`` for ``url``; the filesystem is made once per process."""
        import fsspec  # optional dependency: only URLs need it

        protocol = url.split("://", 1)[0]
        with self._lock:
            if self._pid != os.getpid():  # a forked loader worker: the parent's event loop and sockets are gone
                self._pid, self._fs, self._failures = os.getpid(), {}, Counter()
            fs = self._fs.get(protocol)
            if fs is None:
                try:
                    fs = self._fs[protocol] = self._make_fs(fsspec, protocol)
                except (ImportError, ValueError) as err:
                    raise RuntimeError(f"cannot open {protocol}:// URLs ({err}); install the optional storage "
                                       "dependencies: pip install 'anima_ft[remote]'") from None
        return fs, fs._strip_protocol(url) if protocol not in ("http", "https") else url

    def _make_fs(self, fsspec, protocol: str):
        """The filesystem of ``protocol``; the asynchronous ones (S3, GCS, HTTP) on this process's
        :func:`~anima_ft.data.driven_loop.driven_loop` (see :meth:`wait`)."""
        timeout = self.options.request_timeout_s
        connections = max(10, 2 * self.options.prefetch_samples)
        if protocol in ("s3", "s3a"):
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, loop=driven_loop().loop, config_kwargs={
                "retries": {"total_max_attempts": 1}, "connect_timeout": timeout, "read_timeout": timeout,
                "max_pool_connections": connections, "http_session_cls": _botocore_session_class()})
            fs.retries = 1  # s3fs's own retry loop: off, every try is made and counted by _call
            return fs
        if protocol in ("http", "https"):
            import aiohttp

            return fsspec.filesystem(protocol, skip_instance_cache=True, loop=driven_loop().loop,
                                     get_client=_http_client, client_kwargs={
                "timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
                "limit": connections})
        if protocol in ("gs", "gcs"):
            return fsspec.filesystem(protocol, skip_instance_cache=True, loop=driven_loop().loop)
        return fsspec.filesystem(protocol, skip_instance_cache=True)

    @staticmethod
    def wait(fut: Future) -> Any:
        """The result of a :meth:`submit_ranges` future, running the requests' event loop in this thread until
        it is done (:class:`~anima_ft.data.driven_loop.DrivenLoop`): the bodies that arrive meanwhile are received
        here, with no other thread competing for the GIL."""
        return driven_loop().wait(fut)

    def _call(self, what: str, url: str, fn: Callable[[], Any], expect_len: int | None = None) -> Any:
        """Run ``fn`` with the retry policy; ``expect_len`` makes a shorter result a transient ``short_read``."""
        last: BaseException | None = None
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                out = _checked(fn(), expect_len)
            except Exception as err:
                last, wait = err, self._failed_try(what, url, err, attempt)
                if wait is None:
                    break
                self._sleep(wait)
                continue
            return self._succeeded(url, out)
        raise self._gave_up(what, url, last)

    async def _acall(self, what: str, url: str, fn: Callable[[], Awaitable[Any]],
                     expect_len: int | None = None) -> Any:
        """:meth:`_call` for a coroutine function, run on the filesystem's event loop (waits without blocking it)."""
        last: BaseException | None = None
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                out = _checked(await fn(), expect_len)
            except Exception as err:
                last, wait = err, self._failed_try(what, url, err, attempt)
                if wait is None:
                    break
                if self._sleep is time.sleep:
                    await asyncio.sleep(wait)
                else:  # a test's fake clock
                    self._sleep(wait)
                continue
            return self._succeeded(url, out)
        raise self._gave_up(what, url, last)

    def _failed_try(self, what: str, url: str, err: Exception, attempt: int) -> float | None:
        """Count a failed try and return the wait before the next one; None after the last; raises permanent errors."""
        opts = self.options
        if not is_transient(err):
            raise err
        if attempt == opts.max_attempts:
            return None
        self.counters.add(retries=1, **{f"retry_reasons.{_reason(err)}": 1})
        wait = min(opts.retry_backoff_s * 2 ** (attempt - 1), opts.retry_backoff_max_s)
        log.debug("%s %s failed (%s), try %d of %d in %.2fs", what, redact(url), redact(err), attempt + 1,
                  opts.max_attempts, wait)
        return wait * random.uniform(0.5, 1.5)

    def _succeeded(self, url: str, out: Any) -> Any:
        with self._lock:
            self._failures[location(url)] = 0
        self.counters.add(requests=1, bytes=len(out) if isinstance(out, (bytes, bytearray)) else 0)
        return out

    def _gave_up(self, what: str, url: str, last: BaseException | None) -> Exception:
        """The error of a request that failed every try (StorageUnreachable after too many in a row)."""
        opts, where = self.options, location(url)
        self.counters.add(failed_requests=1)
        with self._lock:
            self._failures[where] += 1
            failures = self._failures[where]
        detail = f"{type(last).__name__}: {redact(last)}"
        if failures >= opts.unreachable_after_failures:
            return StorageUnreachable(
                f"{where} is unreachable: {failures} requests in a row failed after {opts.max_attempts} tries each "
                f"(last: {what} {redact(url)}: {detail}); check the endpoint, the network and the credentials in "
                "the storage library's environment (for S3: AWS_* variables, AWS_ENDPOINT_URL, ~/.aws)")
        return RemoteReadError(f"{what} {redact(url)} failed after {opts.max_attempts} tries: {detail}")

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object with one ranged GET (retried)."""
        fs, path = self.filesystem(url)
        return self._call("GET range", url, lambda: fs.cat_file(path, start=start, end=end), expect_len=end - start)

    def submit_ranges(self, ranges: list[tuple[str, int, int]]) -> list[Future | None]:
        """Start :meth:`read_range` of each ``(url, start, end)`` as a coroutine on its filesystem's event loop,
        waking the loop once for all of them: a ``Future`` of the bytes each, or None where the filesystem is not
        asynchronous (the caller reads that one in a thread). Cancelling a Future cancels its request."""
        out: list[Future | None] = []
        jobs: dict[Any, list] = {}
        for url, start, end in ranges:
            fs, path = self.filesystem(url)
            if not getattr(fs, "async_impl", False) or getattr(fs, "loop", None) is None:
                out.append(None)
                continue
            fut: Future = Future()
            out.append(fut)
            jobs.setdefault(fs.loop, []).append((fut, self._acall(
                "GET range", url, functools.partial(self.range_coroutine(fs), fs, path, start, end),
                expect_len=end - start)))
        for loop, batch in jobs.items():
            loop.call_soon_threadsafe(_start_all, loop, batch)
        return out

    @staticmethod
    def range_coroutine(fs) -> Callable[[Any, str, int, int], Awaitable[bytes | bytearray]]:
        """``f(fs, path, start, end)``: the coroutine function of one ranged GET that :meth:`submit_ranges` runs
        (:func:`_http_range`, a private ``bytearray``, on HTTP filesystems; the filesystem's ``_cat_file``,
        ``bytes``, on the others). The benchmark's plain GETs use it too."""
        from fsspec.implementations.http import HTTPFileSystem

        if isinstance(fs, HTTPFileSystem):
            return _http_range
        return lambda fs, path, start, end: fs._cat_file(path, start=start, end=end)

    def read_bytes(self, url: str) -> bytes:
        """A whole (small) object, e.g. a shard index."""
        fs, path = self.filesystem(url)
        return self._call("GET", url, lambda: fs.cat_file(path))

    def size(self, url: str) -> int:
        """An object's size in bytes; ``FileNotFoundError`` when it does not exist."""
        fs, path = self.filesystem(url)
        return int(self._call("HEAD", url, lambda: fs.info(path)["size"]))

    def exists(self, url: str) -> bool:
        """Whether the object exists (transient errors are retried, never read as "missing")."""
        try:
            self.size(url)
        except FileNotFoundError:
            return False
        return True

    def glob(self, pattern: str) -> list[str]:
        """Object URLs matching a glob (``s3://bucket/shards/*.tar``); a plain prefix lists that "directory"."""
        fs, path = self.filesystem(pattern)
        protocol = pattern.split("://", 1)[0]
        fs.invalidate_cache()
        if any(c in path for c in GLOB_CHARS):
            found = self._call("LIST", pattern, lambda: fs.glob(path))
        else:
            found = self._call("LIST", pattern, lambda: fs.ls(path.rstrip("/"), detail=False))
        if protocol in ("http", "https"):
            return sorted(found)
        return sorted(f"{protocol}://{p}" for p in found)

    def read_many(self, urls: list[str], fn: Callable[[str], Any], max_workers: int = 16) -> list[Any]:
        """``[fn(url) or the exception it raised]`` for every url, run concurrently (order kept)."""
        def safe(url):
            try:
                return fn(url)
            except Exception as err:  # returned, so the caller decides per url (skip, or a named error)
                return err

        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(urls)))) as pool:
            return list(pool.map(safe, urls))

    def get_file(self, url: str, local_path: str, size: int) -> None:
        """Copy an object to a local file (streamed, retried); a copy of the wrong size is an ``OSError``."""
        fs, path = self.filesystem(url)

        def get():
            fs.get_file(path, local_path)
            got = os.path.getsize(local_path)
            if got != size:
                raise ShortRead(f"copied {got} of {size} bytes")

        self._call("GET file", url, get)

    def put_file(self, local_path: str, url: str) -> None:
        """Upload a local file to ``url`` (retried); checks the stored object's size afterwards."""
        fs, path = self.filesystem(url)
        want = os.path.getsize(local_path)

        def put():
            fs.put_file(local_path, path)
            fs.invalidate_cache()
            got = fs.info(path)["size"]
            if got != want:
                raise ShortRead(f"stored {got} of {want} bytes")

        self._call("PUT", url, put)
