"""Shards named by plain http:// URLs (fsspec's HTTP filesystem, aiohttp): public objects of moto's S3 server on
127.0.0.1 behind the fault-injecting proxy, compared bit for bit with the same shards read from local disk.

Connection resets are injected on reused keep-alive connections: aiohttp would retry such a request once by
itself (RFC 9112 9.3.1), below every counter; the store turns that off, so each reset must appear exactly once as
a counted ``connection`` retry.
"""

from __future__ import annotations

import random

import pytest
import torch
from fault_proxy import FaultProxy, S3Server, assert_streams_match

from anima_ft.config.remote import RemoteConfig
from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.sources import ShardReader, build_catalog

pytest.importorskip("aiohttp")
FAST = dict(retry_backoff_s=0.001, retry_backoff_max_s=0.01, request_timeout_s=10.0)


@pytest.fixture(scope="module")
def http_shards(two_sources):
    """(proxy, local target dir, http:// URLs of the target shards through the proxy)."""
    import boto3

    server = S3Server().start()
    proxy = FaultProxy(server.url).start()
    client = boto3.client("s3", endpoint_url=server.url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="pub")
    target = two_sources[0]
    for f in sorted(target.iterdir()):
        if f.name.endswith((".tar", ".index.json")):
            client.put_object(Bucket="pub", Key=f"target/{f.name}", Body=f.read_bytes(), ACL="public-read")
    urls = [f"{proxy.url}/pub/target/{t.name}" for t in sorted(target.glob("*.tar"))]
    yield proxy, target, urls
    proxy.stop()
    server.stop()


@pytest.mark.parametrize("in_flight", [0, 2])  # 2 of 5: the completing thread starts the next requests
def test_http_stream_matches_local(http_shards, in_flight):
    proxy, target, urls = http_shards
    proxy.choose = lambda m, p, h: None
    remote = MixedStream([SourceSpec("target", urls)], micro_batch_size=2, seed=3,
                         remote=RemoteConfig(prefetch_samples=5, requests_in_flight=in_flight, **FAST))
    local = MixedStream([SourceSpec("target", str(target))], micro_batch_size=2, seed=3)
    assert_streams_match(remote, local, 10)
    assert remote.stats()["io"]["retries"] == 0 and remote.stats()["io"]["requests"] > 0


def test_http_resets_on_keepalive_connections_are_counted_once_each(http_shards):
    proxy, target, urls = http_shards
    rng = random.Random(11)
    proxy.choose = lambda m, p, h: "reset" if m == "GET" and "Range" in h and rng.random() < 0.3 else None
    proxy.injected.clear()
    cat, local = build_catalog([SourceSpec("target", urls)]), build_catalog([SourceSpec("target", str(target))])
    reader = ShardReader(cat, remote=RemoteConfig(prefetch_samples=4, max_attempts=12, **FAST))
    ref = ShardReader(local)
    ids = list(range(len(cat))) * 2
    random.Random(1).shuffle(ids)
    start = len(proxy.log)
    reader.schedule(ids)
    for i in ids:
        got, want = reader.read(i), ref.read(i)
        for name in ("latent", "qwen_states", "t5_ids"):
            assert torch.equal(got[name], want[name]), name
        assert got["meta"] == want["meta"]
    reader.close()
    proxy.choose = lambda m, p, h: None
    io = reader.store.counters.snapshot()
    resets = proxy.injected["reset"]
    log = proxy.log[start:]
    assert resets >= 5
    # each reset is one counted retry (aiohttp's own silent second try would hide some of them)
    assert io["retries"] == resets and io["retry_reasons.connection"] == resets and io["failed_requests"] == 0
    assert io["requests"] == sum(1 for r in log if r[0] == "GET" and r[3] is None) == len(ids)


def test_full_validation_of_http_shards_reads_every_sample_like_local(http_shards):
    proxy, target, urls = http_shards
    proxy.choose = lambda m, p, h: None
    remote = build_catalog([SourceSpec("target", urls)], validate="full", remote=RemoteConfig(prefetch_samples=3))
    local = build_catalog([SourceSpec("target", str(target))], validate="full")
    assert remote.keys == local.keys and remote.skipped == local.skipped
    assert (remote.table == local.table).all()
    spans = local.table[:, 2:4]  # span_start, span_end: every sample's bytes were read (and checked) remotely
    index_bytes = sum(f.stat().st_size for f in target.glob("*.index.json"))
    assert remote.build_io["bytes"] == index_bytes + int((spans[:, 1] - spans[:, 0]).sum())
