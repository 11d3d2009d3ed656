"""Benchmark (not a test): MixedStream throughput on 1024-px-equivalent samples from local shards.

Writes synthetic shards (latent bf16 [16, 128, 128], Qwen states bf16 [512, 1024], 512 T5 ids: what a 1 MP image
with a long caption costs), then times the stream with one source and with a 75/25 target/replay mix, in the main
process (num_workers=0: one core) and optionally with DataLoader workers. Reports samples/s and samples/s per core,
and the cost of the per-member checksums: the same tars read through their v2 index (verified) and through a v1
copy of the index (not verified), in CPU seconds of one process, plus the bare hash time per sample (xxh3_64, and
blake2b for comparison).

    python launch/bench/bench_loader.py --samples 512 --out /tmp/anima_bench_shards
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from anima_ft.data import EncodedSample, MixedStream, ShardWriter, SourceSpec, make_fingerprint
from anima_ft.data.plan import MixPlanner
from anima_ft.data.shard_format import encode_members, index_path_for, member_checksum
from anima_ft.data.sources import build_catalog

FINGERPRINT = make_fingerprint("bench-vae", "bench-text")


def write_shards(out: Path, name: str, num_samples: int, per_shard: int) -> None:
    """Synthetic 1 MP samples (random values; the loader's cost does not depend on them)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 128, 128, generator=g).to(torch.bfloat16)
    states = torch.randn(512, 1024, generator=g).to(torch.bfloat16)
    t5 = torch.randint(2, 32000, (512,), generator=g)
    for shard in range(0, num_samples, per_shard):
        path = out / f"{name}-{shard // per_shard:05d}.tar"
        if path.with_name(path.stem + ".index.json").exists():
            continue
        with ShardWriter(path, FINGERPRINT) as writer:
            for i in range(shard, min(num_samples, shard + per_shard)):
                meta = {"caption": f"sample {i}", "source": name, "bucket": [1024, 1024]}
                writer.add(EncodedSample(f"{name}_{i:07d}", latent, states, t5, meta))
            writer.commit()


def measure(sources: list[SourceSpec], batches: int, micro: int, workers: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) over ``batches`` micro-batches after the
    warm-up batches. With workers=0 the CPU-second rate is the per-core rate, immune to other load on the machine;
    with workers, this process's CPU is what taking the batches from the workers costs the training process."""
    stream = MixedStream(sources, micro_batch_size=micro, num_workers=workers, seed=0)
    it = iter(stream)
    for _ in range(2 + 4 * workers):  # the workers' start and their first prefetched batches: outside the timing
        next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in itertools.islice(it, batches):
        pass
    n = batches * micro
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def plan_cost_us(sources: list[SourceSpec], micro: int, steps: int = 2000, world: int = 8) -> float:
    """Microseconds of planning per sample a rank loads, in a world of 8 ranks (each rank plans the whole global
    batch's counts, buckets and cursor moves, and materializes only its own micro-batch)."""
    catalog = build_catalog(sources)
    planner = MixPlanner(catalog, {s.name: s.weight for s in sources}, micro, 1, world, seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        planner.next_global_batch(materialize=[0])
    return (time.perf_counter() - start) / (steps * micro) * 1e6  # per sample this rank loads


def v1_twin(src: Path, dst: Path) -> None:
    """The same tars (hard links) with v1 indices: no checksums, so the loader verifies nothing."""
    dst.mkdir(parents=True, exist_ok=True)
    for tar in sorted(src.glob("*.tar")):
        if not (dst / tar.name).exists():
            os.link(tar, dst / tar.name)
        index = json.loads(index_path_for(tar).read_text())
        index["format_version"] = 1
        index.pop("checksum")
        for entry in index["samples"]:
            entry.pop("checksums")
        index_path_for(dst / tar.name).write_text(json.dumps(index))


def checksum_cost(out: Path, batches: int, micro: int, repeats: int) -> dict:
    """Load CPU time per sample with (v2) and without (v1 index) checksum verification, and bare hash times."""
    v1_twin(out / "target", out / "target_v1")
    runs = {"v2": [], "v1": []}
    for _ in range(repeats):  # interleaved, median: the machine may be shared
        for label, folder in (("v2", "target"), ("v1", "target_v1")):
            runs[label].append(measure([SourceSpec("target", str(out / folder))], batches, micro, 0)[1])
    load_us = {k: 1e6 / statistics.median(v) for k, v in runs.items()}
    g = torch.Generator().manual_seed(0)
    sample = EncodedSample("k", torch.randn(16, 128, 128, generator=g), torch.randn(512, 1024, generator=g),
                           torch.randint(2, 32000, (512,), generator=g), {"caption": "c", "bucket": [1024, 1024]})
    members = list(encode_members(sample).values())

    def per_sample_us(fn, n=20) -> float:
        fn()
        start = time.process_time()
        for _ in range(n):
            for data in members:
                fn(data)
        return (time.process_time() - start) / n * 1e6

    xxh = per_sample_us(lambda d=b"": member_checksum(d))
    blake = per_sample_us(lambda d=b"": hashlib.blake2b(d, digest_size=8).digest())
    return {"checksum": "xxh3_64", "sample_bytes": sum(len(m) for m in members),
            "load_cpu_us_per_sample": {k: round(v, 1) for k, v in load_us.items()},
            "verify_overhead_pct_of_load": round(100 * (load_us["v2"] / load_us["v1"] - 1), 2),
            "hash_us_per_sample": {"xxh3_64": round(xxh, 1), "blake2b": round(blake, 1)},
            "hash_pct_of_v1_load": {"xxh3_64": round(100 * xxh / load_us["v1"], 2),
                                    "blake2b": round(100 * blake / load_us["v1"], 2)}}


def cpu_model() -> str:
    """The CPU model name (lscpu's "Model name", from /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    """Write shards if needed, then print one JSON line per configuration."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/anima_bench_shards")
    p.add_argument("--samples", type=int, default=512, help="samples per source (about 1.6 MB each)")
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per configuration (median reported)")
    p.add_argument("--checksums-only", action="store_true", help="only measure the checksum verification cost")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    write_shards(out / "target", "target", args.samples, args.per_shard)
    write_shards(out / "replay", "replay", args.samples, args.per_shard)
    single = [SourceSpec("target", str(out / "target"), 1.0)]
    mixed = [SourceSpec("target", str(out / "target"), 0.75), SourceSpec("replay", str(out / "replay"), 0.25)]
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}
    print(json.dumps({"machine": machine}))
    print(json.dumps(checksum_cost(out, args.batches, args.micro_batch_size, args.repeats)))
    if args.checksums_only:
        return
    load_us = float("nan")  # per-sample CPU time of the single-source stream (set by the workers=0 run)
    for workers in args.workers:
        runs = {"single": [], "mixed": []}
        for _ in range(args.repeats):  # interleaved, median of N: the machine may be shared
            for label, sources in (("single", single), ("mixed", mixed)):
                runs[label].append(measure(sources, args.batches, args.micro_batch_size, workers))
        rates = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        result = {"workers": workers, "median_samples_per_wall_s": {k: round(v, 1) for k, v in rates.items()},
                  "wall_runs": {k: [round(r[0], 1) for r in v] for k, v in runs.items()},
                  "end_to_end_mixing_overhead_pct": round(100 * (rates["single"] / rates["mixed"] - 1), 2)}
        if workers:  # what the training process pays per batch to take it from a worker (the hand-over)
            result["main_process_cpu_ms_per_batch"] = {
                k: round(statistics.median(args.micro_batch_size / r[1] for r in v) * 1e3, 3) for k, v in runs.items()}
        if workers == 0:  # one process: CPU seconds are core seconds
            cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
            result["median_samples_per_cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
            result["cpu_mixing_overhead_pct"] = round(100 * (cpu["single"] / cpu["mixed"] - 1), 2)
            load_us = 1e6 / cpu["single"]
        print(json.dumps(result))
    # The mixing work itself (counts, slot layout, bucket draw, cursors) is CPU-only and deterministic: time it
    # apart from I/O, as a share of the per-sample load time of the single-source stream.
    plan_us = {label: plan_cost_us(sources, args.micro_batch_size) for label, sources in (("single", single),
                                                                                          ("mixed", mixed))}
    print(json.dumps({"plan_us_per_sample": {k: round(v, 2) for k, v in plan_us.items()},
                      "planning_overhead_pct_of_load": round(100 * (plan_us["mixed"] - plan_us["single"]) / load_us, 3)}))


if __name__ == "__main__":
    main()
