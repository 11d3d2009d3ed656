"""Shards in object storage: a real S3 endpoint (moto's server on 127.0.0.1) behind a fault-injecting proxy.

The same shards are read from local disk and from the store; every comparison is bit for bit against the local
read (the reference), and every injected fault must show up as a retry or a failed request in the I/O counters.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from types import SimpleNamespace

import pytest
import torch
from fault_proxy import FaultProxy, S3Server
from shard_factory import CharText, PoolVAE, write_prepared_source

from anima_ft.config.remote import RemoteConfig, check_remote
from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.object_store import ObjectStore, StorageUnreachable, redact
from anima_ft.data.prefetch import SpanPrefetcher
from anima_ft.data.prepare import PrepareConfig, prepare_shards
from anima_ft.data.shard_cache import ShardCache
from anima_ft.data.sources import ShardReader, build_catalog
from anima_ft.data.verify import verify
from anima_ft.eval.eval_sets import load_shard_eval_set

pytest.importorskip("s3fs")
SECRET = "not-a-real-secret-0123456789"
FAST = dict(retry_backoff_s=0.001, retry_backoff_max_s=0.01, request_timeout_s=10.0)
TENSORS = ("latents", "qwen_states", "qwen_mask", "t5_ids", "t5_mask", "source_id")


@pytest.fixture(scope="module")
def s3(two_sources):
    """moto S3 on 127.0.0.1 behind a FaultProxy; bucket ``shards`` holds ``target/`` and ``replay/``."""
    import boto3

    server = S3Server().start()
    proxy = FaultProxy(server.url).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", proxy.url)  # every request of the code under test goes through the proxy
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="shards")
        store = ObjectStore()
        target, replay, keys = two_sources
        for name, folder in (("target", target), ("replay", replay)):
            for tar in sorted(folder.glob("*.tar")):
                store.put_file(str(tar), f"s3://shards/{name}/{tar.name}")
                index = tar.with_name(tar.name[:-4] + ".index.json")
                store.put_file(str(index), f"s3://shards/{name}/{index.name}")
        yield SimpleNamespace(proxy=proxy, server=server, target=target, replay=replay, keys=keys)
        proxy.choose, proxy.latency_s = (lambda m, p, h: None), 0.0
    proxy.stop()
    server.stop()


@pytest.fixture
def clean_proxy(s3):
    """The proxy with no faults and no latency before and after the test."""
    s3.proxy.choose, s3.proxy.latency_s = (lambda m, p, h: None), 0.0
    yield s3.proxy
    s3.proxy.choose, s3.proxy.latency_s = (lambda m, p, h: None), 0.0


def specs(s3, remote: bool) -> list[SourceSpec]:
    if remote:
        return [SourceSpec("target", "s3://shards/target/", 0.7), SourceSpec("replay", ["s3://shards/replay/*.tar"], 0.3)]
    return [SourceSpec("target", str(s3.target), 0.7), SourceSpec("replay", [str(s3.replay / "*.tar")], 0.3)]


def stream(s3, remote: bool, rank: int = 0, world: int = 1, accum: int = 2, **kw) -> MixedStream:
    return MixedStream(specs(s3, remote), micro_batch_size=2, grad_accum_steps=accum, dp_rank=rank,
                       dp_world_size=world, seed=7, caption_dropout=0.3,
                       remote=kw.pop("cfg", RemoteConfig(prefetch_samples=6, **FAST)), **kw)


def take(s: MixedStream, n: int) -> list[dict]:
    it = iter(s)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["key"], x["source"], x["caption"]) == (y["key"], y["source"], y["caption"])
        for name in TENSORS:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_stream_matches_local_bitwise(s3, clean_proxy):
    for rank in (0, 1):
        local, remote = stream(s3, False, rank, 2), stream(s3, True, rank, 2)
        assert remote.catalog.keys == local.catalog.keys
        assert_same(take(remote, 14), take(local, 14))  # 14 micro-batches: past an epoch of every bucket
        io = remote.stats()["io"]
        assert io["requests"] > 0 and io["retries"] == 0 and io["failed_requests"] == 0
        assert local.stats()["io"]["requests"] == 0


def test_stream_with_workers_matches_local(s3, clean_proxy):
    assert_same(take(stream(s3, True, num_workers=2), 8), take(stream(s3, False), 8))


def test_resume_mid_epoch_matches_uninterrupted_local(s3, clean_proxy):
    reference = take(stream(s3, False), 12)
    first = stream(s3, True)
    head = take(first, 5)  # 5 micro-batches: inside global batch 2 (accum 2)
    resumed = stream(s3, True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same(head + take(resumed, 7), reference)


@pytest.mark.slow
def test_world_size_change_matches_local(s3, clean_proxy):
    reference = take(stream(s3, False), 12)
    # 2 ranks x accum 1 -> 1 rank x accum 2 (the same M and A x W): the batches of an uninterrupted run
    pair = [stream(s3, True, r, 2, accum=1) for r in (0, 1)]
    for s in pair:
        take(s, 3)
    states = [s.state_dict() for s in pair]
    one_remote, one_local = stream(s3, True), stream(s3, False)
    one_remote.load_state_dicts(states)
    one_local.load_state_dicts(states)
    assert_same(take(one_remote, 4), take(one_local, 4))
    assert_same(take(stream(s3, True), 12)[6:10], reference[6:10])  # and that is the uninterrupted run's


def _faults(seed: int, rate: float, kinds=("500", "503", "reset", "truncate")):
    rng = random.Random(seed)
    return lambda method, path, headers: (rng.choice(kinds) if method == "GET" and "Range" in headers
                                          and rng.random() < rate else None)


def test_injected_faults_are_retried_and_counted(s3, clean_proxy):
    local = build_catalog(specs(s3, False))
    cat = build_catalog(specs(s3, True))
    clean_proxy.choose = _faults(seed=3, rate=0.3)
    clean_proxy.latency_s = 0.002
    reader = ShardReader(cat, remote=RemoteConfig(prefetch_samples=5, max_attempts=10, **FAST))
    ids = list(range(len(cat))) * 3
    random.Random(0).shuffle(ids)
    start = len(clean_proxy.log)
    reader.schedule(ids)
    ref = ShardReader(local)
    for i in ids:
        got, want = reader.read(i), ref.read(i)
        for name in ("latent", "qwen_states", "t5_ids"):
            assert torch.equal(got[name], want[name])
        assert got["meta"] == want["meta"]
    reader.close()
    io = reader.store.counters.snapshot()
    injected = sum(clean_proxy.injected.values())
    log = clean_proxy.log[start:]
    served = [r for r in log if r[0] == "GET" and r[3] is None]
    assert injected > 10 and set(clean_proxy.injected) == {"500", "503", "reset", "truncate"}
    # every injected fault is counted exactly once, none hidden by the library: aiohttp's own silent retry of a
    # request whose reused keep-alive connection was reset (RFC 9112 9.3.1) is off, so resets are counted too
    assert io["retries"] + io["failed_requests"] == injected
    for k, (method, path, rng, fault) in enumerate(log):  # and each failed try is followed by its retry
        if fault is not None:
            assert any(r[:3] == (method, path, rng) and r[3] is None for r in log[k + 1:])
    assert io["failed_requests"] == 0 and io["requests"] == len(served)
    assert io["retry_reasons.server_error"] == clean_proxy.injected["500"]
    assert io["retry_reasons.throttled"] == clean_proxy.injected["503"]
    assert io["retry_reasons.connection"] == clean_proxy.injected["reset"]
    assert io["retry_reasons.short_read"] == clean_proxy.injected["truncate"]
    clean_proxy.injected.clear()


@pytest.mark.parametrize("in_flight", [0, 2])
def test_stream_under_faults_still_matches_local(s3, clean_proxy, in_flight):
    remote = stream(s3, True, cfg=RemoteConfig(prefetch_samples=4, requests_in_flight=in_flight, max_attempts=12,
                                               **FAST))
    clean_proxy.choose = _faults(seed=5, rate=0.25)
    got = take(remote, 10)
    clean_proxy.choose = lambda m, p, h: None
    assert_same(got, take(stream(s3, False), 10))
    assert remote.stats()["io"]["retries"] > 0 and remote.stats()["skipped"] == {}


def test_bit_flip_in_transit_is_a_counted_skip(s3, clean_proxy):
    cat = build_catalog(specs(s3, True))
    entry = cat.entry(3)
    flipped = f"bytes={entry['span'][0]}-{entry['span'][1] - 1}"
    clean_proxy.choose = lambda m, p, h: "bitflip" if h.get("Range") == flipped else None
    reader = ShardReader(cat, remote=RemoteConfig(**FAST))
    with pytest.raises(Exception) as err:
        reader.read(3)
    assert getattr(err.value, "reason", None) == "checksum_mismatch"
    assert clean_proxy.injected["bitflip"] == 1
    clean_proxy.injected.clear()
    reader.close()


def test_unreachable_bucket_is_a_named_error_on_every_rank(s3, clean_proxy):
    cfg = RemoteConfig(max_attempts=3, unreachable_after_failures=2, prefetch_samples=2, **FAST)
    ranks = [stream(s3, True, r, 2, cfg=cfg) for r in (0, 1)]
    clean_proxy.choose = lambda m, p, h: "500"
    for s in ranks:
        t0 = time.monotonic()
        with pytest.raises(StorageUnreachable, match="s3://shards is unreachable"):
            take(s, 4)
        assert time.monotonic() - t0 < 20  # bound: 2 failures x 3 tries x (timeout + backoff), far below
    with pytest.raises(RuntimeError, match="cannot (list|read) s3://shards/"):
        build_catalog(specs(s3, True), remote=cfg)
    clean_proxy.injected.clear()


def test_prepare_to_s3_uploads_index_last_and_resumes(s3, clean_proxy, tmp_path):
    local = write_prepared_source(tmp_path / "images", tmp_path / "local", shard_size=4)
    cfg = PrepareConfig(out_dir="s3://shards/prep", bucket_area=32 * 32, bucket_width_step=16, min_ar=1.0, max_ar=1.0,
                        shard_size=4, batch_size=3, source_name="fuzz", progress=False)
    start = len(clean_proxy.log)
    remote = prepare_shards([str(tmp_path / "images")], PoolVAE(), CharText(), cfg)
    assert remote == local
    store = ObjectStore()
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    for name in names:  # the uploaded files are the local ones, byte for byte
        assert store.read_bytes(f"s3://shards/prep/{name}") == (tmp_path / "local" / name).read_bytes()
    puts = [path for method, path, _, _ in clean_proxy.log[start:] if method == "PUT"]
    for tar in (n for n in names if n.endswith(".tar")):
        assert puts.index(f"/shards/prep/{tar}") < puts.index(f"/shards/prep/{tar[:-4]}.index.json")
    # a crash between the two uploads: the tar is there, its index is not -> not a finished shard
    first = next(n for n in names if n.endswith(".tar"))
    store.filesystem("s3://shards")[0].rm(f"shards/prep/{first[:-4]}.index.json")
    cat = build_catalog([SourceSpec("fuzz", "s3://shards/prep/")])
    assert cat.skipped["unreadable_shard"] == 1
    start = len(clean_proxy.log)
    assert prepare_shards([str(tmp_path / "images")], PoolVAE(), CharText(), cfg) == local
    puts = [path for method, path, _, _ in clean_proxy.log[start:] if method == "PUT"]
    assert puts == [f"/shards/prep/{first}", f"/shards/prep/{first[:-4]}.index.json", "/shards/prep/prepare_summary.json"]
    assert store.read_bytes(f"s3://shards/prep/{first}") == (tmp_path / "local" / first).read_bytes()


def test_verify_and_eval_sets_read_urls(s3, clean_proxy):
    report = verify(["s3://shards/target/"])
    ref = verify([str(s3.target)])
    assert report.as_dict() == ref.as_dict() and report.good_samples == 18 and not report.problems
    first = sorted(s3.target.glob("*.index.json"))[0]
    name = first.name[: -len(".index.json")]
    flips = iter(["bitflip"])  # the first ranged GET of that shard (a run of adjacent samples) gets one flipped bit
    clean_proxy.choose = lambda m, p, h: next(flips, None) if name in p and "Range" in h else None
    bad = verify([f"s3://shards/target/{name}.tar"])
    assert bad.problems == {"checksum_mismatch": 1}
    clean_proxy.choose = lambda m, p, h: None
    got, want = load_shard_eval_set("s3://shards/replay/"), load_shard_eval_set(s3.replay)
    assert [s.key for s in got] == [s.key for s in want]
    assert all(torch.equal(a.latents, b.latents) and torch.equal(a.qwen_states, b.qwen_states) for a, b in zip(got, want))
    clean_proxy.injected.clear()


def test_cache_serves_the_second_epoch(s3, clean_proxy, tmp_path):
    cfg = RemoteConfig(cache_dir=str(tmp_path / "cache"), cache_max_gb=1.0, **FAST)
    cat = build_catalog(specs(s3, True), remote=cfg)
    reader = ShardReader(cat, remote=cfg)
    ids = list(range(len(cat)))
    reader.schedule(ids)
    first = [reader.read(i) for i in ids]
    reader._cache.close(wait=True)
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 3 and reader.store.counters.snapshot()["cache_fills"] == 3
    start = len(clean_proxy.log)
    second = [reader.read(i) for i in ids]
    assert not [r for r in clean_proxy.log[start:] if r[0] == "GET"]  # nothing from the store
    assert reader.store.counters.snapshot()["cache_hits"] == len(ids)
    assert all(torch.equal(a["latent"], b["latent"]) for a, b in zip(first, second))
    reader.close()


def test_cache_evicts_least_recently_used(tmp_path):
    cache = ShardCache(tmp_path, max_bytes=250, store=ObjectStore())
    for i, name in enumerate("abc"):
        path = cache.path_for(f"s3://b/{name}.tar", "t")
        path.write_bytes(b"x" * 100)
        past = time.time() - 100 + i
        os.utime(path, (past, past))
    assert cache.lookup("s3://b/a.tar", "t", 100) is not None  # a is now the most recent
    cache._evict(50)  # 300 + 50 > 250: the least recently used (b) goes
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == ["a.tar", "c.tar"]


def test_prefetcher_bounds_memory_and_coalesces_adjacent_spans():
    calls, peak = [], [0]
    data = bytes(range(256)) * 64

    def fetch(shard, start, end):
        calls.append((shard, start, end))
        return data[start:end]

    pf = SpanPrefetcher(fetch, depth=3, max_run_bytes=300)
    spans = [(0, i * 100, i * 100 + 100) for i in range(7)] + [(1, 0, 50), (0, 900, 1000)]
    pf.schedule(spans)
    for span in spans:
        peak[0] = max(peak[0], pf._held)
        assert pf.take(*span) == data[span[1]:span[2]]
    assert peak[0] <= 3
    assert calls[:3] == [(0, 0, 300), (0, 300, 400), (0, 400, 500)]  # adjacent spans in one run, within the depth
    assert pf.take(0, 5, 10) == data[5:10] and calls[-1] == (0, 5, 10)  # out of order: fetched directly
    pf.close()


def test_credentials_never_in_state_or_logs(s3, clean_proxy):
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger("anima_ft")
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        clean_proxy.choose = _faults(seed=1, rate=0.3)
        s = stream(s3, True)
        take(s, 3)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    clean_proxy.injected.clear()
    assert records and not any(SECRET in r or "testing" in r for r in records)
    assert SECRET not in json.dumps(s.state_dict())
    assert redact("https://u:pw@h.example/x.tar?X-Amz-Signature=abc") == "https://h.example/x.tar?<redacted>"
    with pytest.raises(ValueError, match="cache_max_gb"):
        check_remote(RemoteConfig(cache_dir="/tmp/c"))


def test_missing_source_prefix_is_a_named_error(s3, clean_proxy):
    with pytest.raises(ValueError, match="s3://shards/nothing/"):
        build_catalog([SourceSpec("x", "s3://shards/nothing/")])
