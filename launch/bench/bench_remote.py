"""Remote-shard loader throughput against plain concurrent ranged GETs, on one machine (127.0.0.1 only).

Writes shards of 1024-px-equivalent samples (latent 16x128x128 bf16 + 512 Qwen tokens x 1024 bf16: about 1.6 MB
each), serves them on 127.0.0.1 with ``--latency-ms`` added to every request, and measures in the same run, against
the same endpoint and the same objects:

* plain GETs: ``--in-flight`` (default ``--pool``) concurrent ranged GETs of the sample spans on the event loop
  of the same filesystem the loader uses, nothing decoded, by two clients: fsspec's ``_cat_file`` and the store's own request coroutine
  (``ObjectStore.range_coroutine``, what the loader's requests run); the faster round of either is the limit of
  the setup, the denominator;
* loader: one ``MixedStream`` (num_workers=0, micro_batch_size 1) with ``data.remote.prefetch_samples = --pool``
  and ``data.remote.requests_in_flight = --in-flight`` (as many requests in flight as the plain GETs), checksumming
  and decoding every sample; ``--workers N`` runs it with N DataLoader worker processes instead (each
  with its own pool of ``--pool``; for context: the target is one loader process);
* with ``curl`` installed, also ``curl --parallel`` of the same ranges (a native client, for context only);
* with ``--parts``, also parts of the loader alone in every round (:func:`part_run`): the prefetch pool taking bytes,
  and the reader (pool + decoding): where the loader's share of the plain GETs goes, stage by stage.

Servers (``--server``):

* ``nginx`` (default; ``http://`` URLs read by fsspec's HTTP filesystem): nginx from the Debian packages
  ``nginx-light`` and ``libnginx-mod-http-lua``, one worker process, static files with Range support; the latency
  is ``access_by_lua_block { ngx.sleep(...) }``, a non-blocking per-request delay inside nginx's event loop.
* ``moto`` (``s3://`` URLs read by s3fs): moto's S3 server (pure Python) behind the tests' latency proxy
  (``tests/data/fault_proxy.py``, a thread-per-connection Python proxy that sleeps per request), both in a child
  process. Its plain GETs are limited by moto itself, not by the client.

Nothing is installed here: a missing server binary or module is an error naming the package to install.
The pool is run twice in a row per side (``--repeat``), and the better of each side is reported with both.
Prints one JSON line: byte rates, the loader's share of the plain GETs, samples/s, the pool's memory bound
(pool x sample bytes), the peak RSS growth of the loader, the process CPU time per sample of every round (and the
loader's by thread: robust to other load on the machine, unlike the rates), the CPU model (lscpu) and the load
average. Usage::

    python launch/bench/bench_remote.py --server nginx --latency-ms 20 --pool 32 --samples 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
NGINX_MODULES = Path("/usr/lib/nginx/modules")
NGINX_PACKAGES = "nginx-light libnginx-mod-http-lua"


def cpu_model() -> str:
    """The ``Model name`` line of lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def write_shards(out: Path, num_shards: int, per_shard: int) -> int:
    """Shards of 1024x1024-bucket samples; returns the bytes of one sample span."""
    from anima_ft.data.shard_format import EncodedSample, ShardWriter, make_fingerprint

    g = torch.Generator().manual_seed(0)
    fp = make_fingerprint({"bench": 1}, {"bench": 1})
    span = 0
    for s in range(num_shards):
        with ShardWriter(out / f"bench-{s:04d}.tar", fp) as w:
            for i in range(per_shard):
                w.add(EncodedSample(f"b{s}_{i:05d}", torch.randn(16, 128, 128, generator=g),
                                    torch.randn(512, 1024, generator=g), torch.randint(2, 32000, (128,), generator=g),
                                    {"caption": "bench", "bucket": [1024, 1024]}))
            span = w.samples[-1]["span"][1] - w.samples[-1]["span"][0]
            w.commit()
    return span


def nginx_paths() -> tuple[str, list[Path]]:
    """The nginx binary and the lua modules it loads; exits naming the packages to install when one is missing."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    modules = [NGINX_MODULES / "ndk_http_module.so", NGINX_MODULES / "ngx_http_lua_module.so"]
    missing = [str(m) for m in modules if not m.exists()]
    if binary is None or missing:
        raise SystemExit(f"bench_remote --server nginx: {'nginx' if binary is None else ', '.join(missing)} not "
                         f"found; install the Debian packages: apt-get install {NGINX_PACKAGES} (or use --server moto)")
    return binary, modules


class NginxServer:
    """nginx (one worker) serving ``root`` on 127.0.0.1 with a per-request delay of ``latency_ms`` (lua ngx.sleep)."""

    def __init__(self, root: Path, latency_ms: float, workdir: Path):
        from anima_ft.runtime import free_port

        binary, modules = nginx_paths()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        delay = f"access_by_lua_block {{ ngx.sleep({latency_ms / 1000:.6f}) }}" if latency_ms > 0 else ""
        tmp = workdir / "nginx-tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text("\n".join([
            *(f"load_module {m};" for m in modules),
            "daemon off;", "master_process off;", "worker_processes 1;", f"pid {workdir / 'nginx.pid'};",
            f"error_log {workdir / 'nginx-error.log'} warn;", "events { worker_connections 4096; }",
            "http {", "  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;",
            "  keepalive_requests 1000000; keepalive_timeout 300s;",
            *(f"  {k}_temp_path {tmp};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
            f"  server {{ listen 127.0.0.1:{self.port}; root {root};",
            f"    location / {{ autoindex on; {delay} }} }}", "}", ""]))
        self._conf, self._log, self._binary = conf, workdir / "nginx-error.log", binary
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        """The nginx process (with ``master_process off`` the only one: it serves every request)."""
        return self._proc.pid

    def start(self) -> NginxServer:
        """Start nginx and wait until it answers (returns self)."""
        import urllib.request

        self._proc = subprocess.Popen([self._binary, "-c", str(self._conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(100):
            if self._proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self._proc.stderr.read().decode()} "
                                   f"{self._log.read_text() if self._log.exists() else ''}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer on {self.url}")

    def stop(self) -> None:
        """Stop nginx."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def serve_moto(latency_ms: float) -> None:
    """Child process: moto + the latency proxy, apart from the measured process (no shared GIL); prints the URLs."""
    from fault_proxy import FaultProxy, S3Server

    server = S3Server().start()
    proxy = FaultProxy(server.url, latency_s=latency_ms / 1000).start()
    print(server.url, proxy.url, flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    proxy.stop()
    server.stop()


PLAIN_CLIENTS = ("cat_file", "store")
TARGET_SHARE = 0.8  # the loader's share of the plain GETs' byte rate that docs/data.md#remote-throughput states


def plain_gets(store, spans: list[tuple[str, int, int]], pool: int, client: str = "cat_file") -> tuple[int, float, float]:
    """``pool`` concurrent ranged GETs of ``spans`` on the filesystem's own event loop, nothing else done with the
    bodies: (bytes, seconds, process CPU seconds). ``client``: ``cat_file`` (fsspec's ``_cat_file``, bytes) or
    ``store`` (``ObjectStore.range_coroutine``: the coroutine the loader's requests run, without the retry wrapper)."""
    from fsspec.asyn import sync

    fs, _ = store.filesystem(spans[0][0])
    paths = [(store.filesystem(u)[1], a, b) for u, a, b in spans]
    get = (store.range_coroutine(fs) if client == "store"
           else lambda fs, p, a, b: fs._cat_file(p, start=a, end=b))

    async def run() -> int:
        sem = asyncio.Semaphore(pool)

        async def one(p, a, b):
            async with sem:
                data = await get(fs, p, a, b)
            if len(data) != b - a:
                raise RuntimeError(f"plain GET of {p} [{a}, {b}) returned {len(data)} bytes")
            return len(data)

        return sum(await asyncio.gather(*(one(*s) for s in paths)))

    t0, c0 = time.perf_counter(), time.process_time()
    got = sync(fs.loop, run)
    return got, time.perf_counter() - t0, time.process_time() - c0


def proc_stat(path: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system so far) from a /proc ``stat`` file; None when it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the thread or process ended meanwhile
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads so far, summed by thread name without its number
    (``MainThread``, ``fsspecIO``, ``span-decode``; /proc/self/task)."""
    import threading

    names = {t.native_id: t.name.split("_")[0] for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        stat = proc_stat(f"/proc/self/task/{tid}/stat")
        if stat is not None:
            name = names.get(int(tid), "other")
            out[name] = out.get(name, 0.0) + stat[1]
    return out


def measured_latency_ms(store, span: tuple[str, int, int], n: int = 10) -> float:
    """Median time of ``n`` sequential 1-byte ranged GETs: the latency one request sees (added + server)."""
    from fsspec.asyn import sync

    fs, path = store.filesystem(span[0])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(fs.loop, fs._cat_file, path, start=span[1], end=span[1] + 1)
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def curl_gets(spans: list[tuple[str, int, int]], pool: int) -> float | None:
    """Bytes/s of ``curl --parallel`` fetching the same ranges (None without curl or for s3:// URLs)."""
    curl = shutil.which("curl")
    if curl is None or not spans[0][0].startswith("http"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".curl", delete=False) as f:
        for url, a, b in spans:
            f.write(f'url = "{url}"\nrange = "{a}-{b - 1}"\noutput = "/dev/null"\n')
    try:
        t0 = time.perf_counter()
        subprocess.run([curl, "-sfZ", "--parallel-max", str(pool), "-K", f.name], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return sum(b - a for _, a, b in spans) / (time.perf_counter() - t0)
    finally:
        os.unlink(f.name)


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``, /proc/self/clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (``VmHWM``), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 / 1e6 for line in f if line.startswith("VmHWM:"))


def children_cpu_s(server_pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of each live child process of this one but the server (DataLoader
    workers), by pid."""
    me, out = os.getpid(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = proc_stat(f"/proc/{pid}/stat")
        if stat is not None and stat[0] == me and int(pid) != server_pid:
            out[int(pid)] = stat[1]
    return out


def server_cpu_s(server_pid: int) -> float:
    """CPU seconds (user + system) of the server process so far (nginx, or the moto + proxy child)."""
    stat = proc_stat(f"/proc/{server_pid}/stat")
    if stat is None:
        raise RuntimeError(f"the server process {server_pid} is gone")
    return stat[1]


def loader_run(source, cfg, samples: int, server_pid: int, micro: int = 1,
               workers: int = 0) -> tuple[float, float, dict, float, dict]:
    """One MixedStream with ``workers`` DataLoader workers: (seconds for ``samples`` batches after the first, peak
    RSS growth MB of this process over its RSS before the stream was made (the kernel's peak mark, reset then; else
    sampled every 16 batches), io counters, CPU seconds of this process and its workers, and CPU seconds by thread
    of this process (``workers`` for the worker processes together; ``server`` for the server process, not in the
    total), over the same batches)."""
    from anima_ft.data import MixedStream, SourceSpec

    rss0 = peak = rss_mb()
    kernel_peak = reset_peak_rss()  # the kernel tracks the peak: no /proc read per batch beside the loader's threads
    stream = MixedStream([SourceSpec("bench", source)], micro_batch_size=micro, seed=0, remote=cfg,
                         num_workers=workers)
    it = iter(stream)
    next(it)  # start-up (the first requests) outside the timed part
    t0, c0, threads0, kids0 = time.perf_counter(), time.process_time(), thread_cpu_s(), children_cpu_s(server_pid)
    server0 = server_cpu_s(server_pid)
    for i in range(samples // micro):
        batch = next(it)
        assert batch["latents"].shape == (micro, 16, 128, 128)
        if not kernel_peak and i % 16 == 0:
            peak = max(peak, rss_mb())
    load_s, cpu_s, threads = time.perf_counter() - t0, time.process_time() - c0, thread_cpu_s()
    kids, server = children_cpu_s(server_pid), server_cpu_s(server_pid) - server0
    peak = max(peak, peak_rss_mb() if kernel_peak else rss_mb())
    it.close()
    by_thread = {k: v - threads0.get(k, 0.0) for k, v in threads.items() if v - threads0.get(k, 0.0) > 0}
    if workers:
        by_thread["workers"] = sum(v - kids0.get(pid, 0.0) for pid, v in kids.items())
        cpu_s += by_thread["workers"]
    by_thread["server"] = server
    return load_s, peak - rss0, stream.stats()["io"], cpu_s, by_thread


PARTS = ("prefetch", "decode", "inline")


def inline_run(catalog, ids: list[int], depth: int, store) -> None:
    """The ``inline`` part: one thread does everything. ``depth`` requests in flight on the filesystem's event loop
    (the store's request coroutine, as the loader's pool runs it, without retries), each body taken in order,
    checked, decoded and collated into a micro-batch of one in the loop's own thread: no hand-over between threads
    at all, and no planner. What the loader's per-sample work costs when nothing else shares the GIL."""
    from collections import deque

    from fsspec.asyn import sync

    from anima_ft.data.mixer import collate
    from anima_ft.data.shard_format import decode_owned, decode_span

    fs, _ = store.filesystem(catalog.shard_paths[0])
    get, names = store.range_coroutine(fs), catalog.names

    async def run() -> None:
        window, k = deque(), 0
        for _ in ids:
            while k < len(ids) and len(window) < depth:
                entry = catalog.entry(ids[k])
                path = store.filesystem(catalog.shard_paths[entry["shard"]])[1]
                window.append((asyncio.ensure_future(get(fs, path, *entry["span"])), entry, ids[k]))
                k += 1
            request, entry, sample_id = window.popleft()
            data = await request
            decode = decode_owned if type(data) is bytearray else decode_span
            sample = decode(data, entry, catalog.qwen_dim)
            sample["key"] = catalog.keys[sample_id]
            collate([sample], [False], [0], names)

    sync(fs.loop, run)


def part_run(source, cfg, samples: int, part: str) -> tuple[float, float, dict]:
    """A part of the loader's pipeline alone, over ``samples`` samples in a scattered order: ``prefetch``, the
    prefetch pool's requests taken as bytes in order (``SpanPrefetcher`` with the store's request coroutines, nothing
    decoded); ``decode``, a ``ShardReader`` (the pool plus the checks and decoding in its decode thread) read in
    order, without the planner, collation or batches; ``inline``, :func:`inline_run`. (seconds, process CPU
    seconds, CPU seconds by thread)."""
    from anima_ft.data import SourceSpec
    from anima_ft.data.prefetch import SpanPrefetcher
    from anima_ft.data.sources import ShardReader, build_catalog

    catalog = build_catalog([SourceSpec("bench", source)], remote=cfg)
    ids = [(i * 7919) % len(catalog) for i in range(samples + 1)]
    reader = ShardReader(catalog, remote=cfg)
    pool = None
    try:
        if part == "prefetch":
            spans = [(e["shard"], *e["span"]) for e in map(catalog.entry, ids)]
            pool = SpanPrefetcher(reader._fetch, cfg.prefetch_samples, submit=reader._submit,
                                  in_flight=getattr(cfg, "requests_in_flight", 0) or None)
            pool.schedule(spans)
            run = lambda first, last: [pool.take(*spans[k]) for k in range(first, last)]  # noqa: E731
        elif part == "decode":
            reader.schedule(ids)
            run = lambda first, last: [reader.read(ids[k]) for k in range(first, last)]  # noqa: E731
        else:
            depth = getattr(cfg, "requests_in_flight", 0) or cfg.prefetch_samples
            run = lambda first, last: inline_run(  # noqa: E731
                catalog, ids[first:last], 1 if first == 0 else depth, reader.store)
        run(0, 1)  # start-up outside the timed part
        t0, c0, threads0 = time.perf_counter(), time.process_time(), thread_cpu_s()
        run(1, samples + 1)
        load_s, cpu_s, threads = time.perf_counter() - t0, time.process_time() - c0, thread_cpu_s()
    finally:
        if pool is not None:
            pool.close()
        reader.close()
    return load_s, cpu_s, {k: v - threads0.get(k, 0.0) for k, v in threads.items() if v - threads0.get(k, 0.0) > 0}


def main() -> None:
    """Run the benchmark and print the JSON result."""
    if sys.argv[1:2] == ["--serve-moto"]:
        return serve_moto(float(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("nginx", "moto"), default="nginx")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--pool", type=int, default=32, help="prefetch pool size (data.remote.prefetch_samples: samples "
                   "in flight or fetched, not taken yet)")
    p.add_argument("--in-flight", type=int, default=0, help="of those, requests in flight at once "
                   "(data.remote.requests_in_flight; 0: the pool) = the concurrent plain GETs")
    p.add_argument("--samples", type=int, default=600, help="samples read by each side")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="alternating plain/loader rounds")
    p.add_argument("--micro-batch", type=int, default=1, help="the loader's micro_batch_size")
    p.add_argument("--workers", type=int, default=0,
                   help="the loader's num_workers (DataLoader worker processes; 0, the target's one loader process)")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="threads that check and decode remote samples (anima_ft.data.sources.DECODE_THREADS; 0: in "
                        "the consumer's thread); default: the library's")
    p.add_argument("--parts", action="store_true",
                   help="also time parts of the loader alone in every round: the prefetch pool (bytes only) and the "
                        "reader (pool + decoding), without the planner and collation")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads of this process (1, like a DataLoader worker process)")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)

    from anima_ft.config.remote import RemoteConfig
    from anima_ft.data import sources
    from anima_ft.data.object_store import ObjectStore

    if args.decode_threads is not None:
        sources.DECODE_THREADS = args.decode_threads
    decode_threads = getattr(sources, "DECODE_THREADS", 0)  # 0: decoded in the consumer's thread (older code)

    fields = getattr(RemoteConfig, "__dataclass_fields__", {})  # older anima_ft (A/B runs) has no requests_in_flight
    cfg = (RemoteConfig(prefetch_samples=args.pool, requests_in_flight=args.in_flight)
           if "requests_in_flight" in fields else RemoteConfig(prefetch_samples=args.pool))
    if args.in_flight and "requests_in_flight" not in fields:
        raise SystemExit("bench_remote --in-flight: this anima_ft has no data.remote.requests_in_flight")
    concurrency = args.in_flight or args.pool  # requests in flight: the loader's and the plain GETs'
    if args.server == "nginx":
        nginx_paths()  # before minutes of writing shards
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "root" / "s").mkdir(parents=True)
        span_bytes = write_shards(tmp / "root" / "s", args.shards, args.per_shard)
        indices = [json.loads(f.read_text()) for f in sorted((tmp / "root" / "s").glob("*.index.json"))]
        child = server = None
        try:
            if args.server == "nginx":
                server = NginxServer(tmp / "root", args.latency_ms, tmp).start()
                base, source = f"{server.url}/s/", f"{server.url}/s/*.tar"
                served = "nginx 1 worker, static files (Range), http:// via fsspec HTTPFileSystem/aiohttp"
                how = "lua ngx.sleep in the access phase of every request"
            else:
                import boto3

                child = subprocess.Popen([sys.executable, __file__, "--serve-moto", str(args.latency_ms)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                server_url, proxy_url = child.stdout.readline().split()
                os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                                  AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=server_url)
                boto3.client("s3", endpoint_url=server_url).create_bucket(Bucket="bench")
                up = ObjectStore()
                for f in sorted((tmp / "root" / "s").glob("*.tar")) + sorted((tmp / "root" / "s").glob("*.json")):
                    up.put_file(str(f), f"s3://bench/s/{f.name}")  # uploads straight to moto, reads via the proxy
                os.environ["AWS_ENDPOINT_URL"] = proxy_url
                base, source = "s3://bench/s/", "s3://bench/s/"
                served = "moto S3 server (Python) + Python latency proxy (tests/data/fault_proxy.py), child process"
                how = "time.sleep per request in the proxy"
            spans = [(f"{base}bench-{k:04d}.tar", *e["span"]) for k, idx in enumerate(indices)
                     for e in idx["samples"]]
            spans = [spans[(i * 7919) % len(spans)] for i in range(args.samples)]  # scattered, like the loader's
            server_pid = server.pid if server is not None else child.pid
            store = ObjectStore(cfg)
            plain_gets(store, spans[:concurrency], concurrency)  # connections opened outside the timed part
            latency = measured_latency_ms(store, spans[0])
            plain, loads, parts = [], [], {part: [] for part in PARTS} if args.parts else {}
            n = args.samples // args.micro_batch * args.micro_batch
            # older anima_ft (A/B runs of this script with PYTHONPATH set to a checkout of it) has only fsspec's
            clients = [c for c in PLAIN_CLIENTS if c != "store" or hasattr(store, "range_coroutine")]
            for _ in range(args.repeat):
                for client in clients:  # the denominator is the faster of the two clients
                    server0 = server_cpu_s(server_pid)
                    got, s, cpu_s = plain_gets(store, spans, concurrency, client)
                    plain.append((got / s, client, cpu_s / len(spans),
                                  (server_cpu_s(server_pid) - server0) / len(spans)))
                load_s, rss_mb, io, cpu_s, threads = loader_run(source, cfg, args.samples, server_pid,
                                                                args.micro_batch, args.workers)
                loads.append((n * span_bytes / load_s, n / load_s, rss_mb, io, cpu_s / n,
                              {k: round(v / n * 1e3, 2) for k, v in sorted(threads.items())},
                              threads["server"] / n))
                for part, rounds in parts.items():
                    part_s, part_cpu, part_threads = part_run(source, cfg, args.samples, part)
                    rounds.append({"MBps": round(args.samples * span_bytes / part_s / 1e6, 1),
                                   "cpu_ms_per_sample": round(part_cpu / args.samples * 1e3, 2),
                                   "by_thread": {k: round(v / args.samples * 1e3, 2)
                                                 for k, v in sorted(part_threads.items())}})
            curl_rate = curl_gets(spans, concurrency)
        finally:
            if server is not None:
                server.stop()
            if child is not None:
                child.stdin.close()
                child.wait(timeout=30)
    (base_rate, base_client, *_), (load_rate, sps, rss_mb, io, *_) = max(plain), max(loads, key=lambda r: r[0])
    # what the target asks of this machine's cores: 0.8 x the plain GETs' rate, each sample costing the loader's
    # CPU plus the server's (both on this machine), at the loader's cheapest round
    loader_machine_ms = min(r[4] + r[6] for r in loads) * 1e3
    cores_needed = TARGET_SHARE * base_rate / span_bytes * loader_machine_ms / 1e3
    print(json.dumps({
        "server": args.server, "served_by": served, "latency_ms": args.latency_ms, "latency_added_by": how,
        "measured_request_latency_ms": round(latency, 1), "pool": args.pool, "in_flight": concurrency,
        "micro_batch": args.micro_batch,
        "workers": args.workers,
        "decode_threads": decode_threads, "sample_bytes": span_bytes, "samples": args.samples,
        "torch_threads": torch.get_num_threads(),
        "plain_get_MBps": round(base_rate / 1e6, 1), "plain_client": base_client,
        "loader_MBps": round(load_rate / 1e6, 1),
        "loader_share_of_plain": round(load_rate / base_rate, 3), "loader_samples_per_s": round(sps, 1),
        "rounds_plain_MBps": [f"{c} {r / 1e6:.1f}" for r, c, *_ in plain],
        "rounds_loader_MBps": [round(r[0] / 1e6, 1) for r in loads],
        "rounds_plain_cpu_ms_per_sample": [f"{c} {cpu * 1e3:.2f}" for _, c, cpu, _ in plain],
        "rounds_plain_server_cpu_ms_per_sample": [f"{c} {srv * 1e3:.2f}" for _, c, _, srv in plain],
        "rounds_loader_cpu_ms_per_sample": [round(r[4] * 1e3, 2) for r in loads],
        "rounds_loader_cpu_ms_per_sample_by_thread": [r[5] for r in loads],
        "rounds_parts": parts or None,
        "parts_best_share_of_plain": {k: round(max(r["MBps"] for r in v) * 1e6 / base_rate, 3)
                                      for k, v in parts.items()} or None,
        "cpu_budget": {"loader_plus_server_cpu_ms_per_sample": round(loader_machine_ms, 2),
                       "cores_needed_for_target": round(cores_needed, 2), "cores": os.cpu_count()},
        "curl_parallel_MBps": None if curl_rate is None else round(curl_rate / 1e6, 1),
        "pool_memory_bound_MB": round(max(1, args.workers) * args.pool * span_bytes / 1e6, 1),
        "peak_rss_growth_MB": round(rss_mb, 1),
        "io": io, "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "anima_ft": str(Path(sources.__file__).parents[2])}))


if __name__ == "__main__":
    main()
