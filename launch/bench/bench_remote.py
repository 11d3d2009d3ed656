"""Remote-shard loader throughput against plain concurrent ranged GETs, on one machine (127.0.0.1 only).

Starts moto's S3 server and the tests' latency proxy in a child process (``tests/data/fault_proxy.py``, ``--latency-ms`` per request),
uploads shards of 1024-px-equivalent samples (latent 16x128x128 bf16 + 512 Qwen tokens x 1024 bf16: about 1.6 MB),
then measures in the same run, against the same endpoint:

* baseline: ``--pool`` threads issuing plain ranged GETs (fsspec/s3fs ``cat_file``) of the same sample spans;
* loader: one ``MixedStream`` (num_workers=0, micro_batch_size 1) with ``data.remote.prefetch_samples = --pool``,
  decoding and checksumming every sample.

Prints one JSON line: byte rates, the loader's share of the baseline, samples/s, the pool's memory bound
(pool x sample bytes) and the peak RSS growth, and the CPU model (lscpu). Usage::

    python launch/bench/bench_remote.py --latency-ms 20 --pool 32 --samples 192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))


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


def serve(latency_ms: float) -> None:
    """Child process: moto + the latency proxy, apart from the measured process (no shared GIL); prints the URLs."""
    from fault_proxy import FaultProxy, S3Server

    server = S3Server().start()
    proxy = FaultProxy(server.url, latency_s=latency_ms / 1000).start()
    print(server.url, proxy.url, flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    proxy.stop()
    server.stop()


def main() -> None:
    """Run the benchmark and print the JSON result."""
    if sys.argv[1:2] == ["--serve"]:
        return serve(float(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--pool", type=int, default=32, help="prefetch pool size = baseline threads")
    p.add_argument("--samples", type=int, default=192, help="samples read by each side")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=32)
    args = p.parse_args()
    import boto3

    from anima_ft.config.remote import RemoteConfig
    from anima_ft.data import MixedStream, SourceSpec
    from anima_ft.data.object_store import ObjectStore

    child = subprocess.Popen([sys.executable, __file__, "--serve", str(args.latency_ms)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    server_url, proxy_url = child.stdout.readline().split()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=server_url)  # uploads straight to the server, reads through the proxy
    try:
        boto3.client("s3", endpoint_url=server_url).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            span_bytes = write_shards(Path(tmp), args.shards, args.per_shard)
            store = ObjectStore()
            for f in sorted(Path(tmp).iterdir()):
                if f.suffix == ".tar":
                    store.put_file(str(f), f"s3://bench/s/{f.name}")
            for f in sorted(Path(tmp).glob("*.index.json")):
                store.put_file(str(f), f"s3://bench/s/{f.name}")
            indices = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.index.json"))]
        os.environ["AWS_ENDPOINT_URL"] = proxy_url
        store = ObjectStore()
        spans = [(f"s3://bench/s/bench-{k:04d}.tar", *e["span"]) for k, idx in enumerate(indices) for e in idx["samples"]]
        spans = [spans[(i * 7919) % len(spans)] for i in range(args.samples)]  # a scattered order, like the loader's

        fs, _ = store.filesystem("s3://bench")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.pool) as pool:
            got = sum(len(b) for b in pool.map(lambda s: fs.cat_file(s[0][5:], start=s[1], end=s[2]), spans))
        base_s = time.perf_counter() - t0

        cfg = RemoteConfig(prefetch_samples=args.pool)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stream = MixedStream([SourceSpec("bench", "s3://bench/s/")], micro_batch_size=1, seed=0, remote=cfg)
        it = iter(stream)
        next(it)  # start-up (first requests) outside the timed part, like the baseline's pool start
        t0 = time.perf_counter()
        for _ in range(args.samples):
            batch = next(it)
            assert batch["latents"].shape == (1, 16, 128, 128)
        load_s = time.perf_counter() - t0
        it.close()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base_rate, load_rate = got / base_s, args.samples * span_bytes / load_s
        print(json.dumps({
            "latency_ms": args.latency_ms, "pool": args.pool, "sample_bytes": span_bytes, "samples": args.samples,
            "baseline_MBps": round(base_rate / 1e6, 1), "loader_MBps": round(load_rate / 1e6, 1),
            "loader_share_of_baseline": round(load_rate / base_rate, 3),
            "loader_samples_per_s": round(args.samples / load_s, 1),
            "pool_memory_bound_MB": round(args.pool * span_bytes / 1e6, 1),
            "peak_rss_growth_MB": round((rss1 - rss0) / 1024, 1), "io": stream.stats()["io"],
            "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg": os.getloadavg()}))
    finally:
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()
