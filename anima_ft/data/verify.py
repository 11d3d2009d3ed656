"""``anima-ft verify DIR...``: check shards end to end, e.g. after copying a dataset to a cluster.

Every shard a directory, glob or tar path names (as a ``SourceSpec`` would) is checked like the loader checks it,
all at once: the whole index schema, the tar's size against the index, then every sample read, its member
checksums verified and its members decoded (shapes, dtypes, finiteness, T5 id range). The report counts problems
per reason (the loader's skip reasons, plus ``size_mismatch`` for a tar whose size differs from its index and
``fingerprint_mismatch`` for shards made with other encoder settings than the rest) with the first examples.

Shards in object storage (``s3://bucket/shards/``, a glob or ``.tar`` URLs) are checked the same way: each index
fetched once, the samples read with ranged GETs (adjacent samples in one request) through the prefetch pool, with
the loader's retries; a sample whose reads still fail counts as ``remote_read_failed``.

Exit status: 0 all good (v1 shards, which have no checksums, are reported but are not an error), 1 bad data,
2 usage error, no shards found, or a store that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from anima_ft.config.remote import RemoteConfig
from anima_ft.data.index_schema import BadIndex, entry_problem
from anima_ft.data.object_store import ObjectStore, RemoteReadError, is_url, redact
from anima_ft.data.prefetch import SpanPrefetcher
from anima_ft.data.shard_format import SampleError, decode_span, index_path_for, read_index, read_sample
from anima_ft.data.sources import SourceSpec, discover_shards, open_remote_shard

MAX_EXAMPLES = 5
AUTO_PROGRESS_BYTES = 1 << 30  # a bar by default once the shards hold more than 1 GiB


@dataclass
class VerifyReport:
    """Counts over every checked shard; ``problems[reason]`` counts bad samples (or shards, for shard reasons)."""

    shards: int = 0
    unreadable_shards: int = 0
    v1_shards: int = 0
    samples: int = 0
    good_samples: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    fingerprints: Counter = field(default_factory=Counter)

    def bad(self, reason: str, where: str) -> None:
        """Count one problem and keep the first examples."""
        self.problems[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def as_dict(self) -> dict:
        """The report as JSON-able data."""
        return {"shards": self.shards, "unreadable_shards": self.unreadable_shards, "v1_shards": self.v1_shards,
                "samples": self.samples, "good_samples": self.good_samples, "problems": dict(self.problems),
                "examples": self.examples, "fingerprints": dict(self.fingerprints)}


def _open(path: Path | str, store: ObjectStore) -> tuple[dict, int]:
    if is_url(path):
        index, size, _ = open_remote_shard(str(path), store)
        return index, size
    index = read_index(path)
    if not path.exists():
        raise BadIndex(index_path_for(path), "(file)", f"its tar {path.name} is missing")
    return index, path.stat().st_size


def verify_shard(path: Path | str, report: VerifyReport, bar: tqdm, index_only: bool = False,
                 store: ObjectStore | None = None) -> str | None:
    """Check one shard (a path or URL) into ``report``; returns its fingerprint hash (None when the index is
    unreadable)."""
    store = store or ObjectStore()
    report.shards += 1
    where = redact(path)
    try:
        index, size = _open(path, store)
    except BadIndex as err:
        report.unreadable_shards += 1
        report.bad("unreadable_shard", f"{where}: field {err.field}: {err.detail}")
        bar.update(path.stat().st_size if not is_url(path) and path.exists() else 0)
        return None
    except RemoteReadError as err:  # retries exhausted on the index or the size request
        report.unreadable_shards += 1
        report.bad("remote_read_failed", f"{where}: {err}")
        return None
    if size != index["tar_bytes"]:
        report.bad("size_mismatch", f"{where}: {size} bytes, the index says {index['tar_bytes']}")
    report.v1_shards += index["format_version"] == 1
    problems = [entry_problem(entry, size) for entry in index["samples"]]
    if is_url(path):
        reads = SpanPrefetcher(lambda _, a, b: store.read_range(str(path), a, b), store.options.prefetch_samples,
                               in_flight=store.options.requests_at_once)
        if not index_only:
            reads.schedule((0, *e["span"]) for e, p in zip(index["samples"], problems) if p is None)
        read = lambda entry: decode_span(reads.take(0, *entry["span"]), entry, index["qwen_dim"])
    else:
        reads = open(path, "rb")
        read = lambda entry: read_sample(reads, entry, index["qwen_dim"])
    try:
        for entry, problem in zip(index["samples"], problems):
            report.samples += 1
            if problem is None and not index_only:
                try:
                    read(entry)
                except SampleError as err:
                    problem = (err.reason, str(err))
                except RemoteReadError as err:
                    problem = ("remote_read_failed", str(err))
            if problem is None:
                report.good_samples += 1
            else:
                report.bad(problem[0], f"{where}:{entry['key']}: {problem[1]}")
            bar.update(max(0, min(entry["span"][1], size) - entry["span"][0]))
    finally:
        reads.close()
    bar.update(max(0, size - (index["samples"][-1]["span"][1] if index["samples"] else 0)))
    return index["fingerprint_hash"]


def verify(paths: list[str], index_only: bool = False, progress: bool | None = None,
           remote: RemoteConfig | None = None) -> VerifyReport:
    """Check every shard ``paths`` name; ``ValueError`` when they name none. ``progress=None``: a bar past 1 GiB."""
    store = ObjectStore(remote)
    tars = discover_shards(SourceSpec("verify", list(paths)), store)
    local = [t for t in tars if not is_url(t)]
    total = sum(t.stat().st_size for t in local if t.exists())
    sizes = store.read_many([str(t) for t in tars if is_url(t)], store.size)
    total += sum(s for s in sizes if isinstance(s, int))
    show = total > AUTO_PROGRESS_BYTES if progress is None else progress
    report = VerifyReport()
    by_shard: dict[Path | str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not show, file=sys.stderr) as bar:
        for tar in tars:
            fp = verify_shard(tar, report, bar, index_only, store)
            if fp is not None:
                by_shard[tar] = fp
                report.fingerprints[fp] += 1
    if len(report.fingerprints) > 1:
        common = report.fingerprints.most_common(1)[0][0]
        for tar, fp in by_shard.items():
            if fp != common:
                report.bad("fingerprint_mismatch", f"{redact(tar)}: encoder fingerprint {fp[:12]}, most shards "
                           f"{common[:12]}")
    return report


def format_report(report: VerifyReport) -> str:
    """The human-readable report."""
    bad = report.samples - report.good_samples
    lines = [f"{report.shards} shards ({report.unreadable_shards} unreadable), {report.samples} samples: "
             f"{report.good_samples} good, {bad} bad"]
    for reason, count in sorted(report.problems.items()):
        lines.append(f"  {reason}: {count}")
        lines += [f"    {example}" for example in report.examples[reason]]
    if report.v1_shards:
        lines.append(f"  note: {report.v1_shards} shards are format v1 (no checksums): their tensor and caption bytes "
                     "cannot be verified; re-run `anima-ft prepare` for checksummed v2 shards")
    lines.append("result: " + ("BAD, see above" if report.problems else "all good"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``anima-ft verify DIR...``: print the report; exit 0 good, 1 bad data, 2 usage error / no shards."""
    p = argparse.ArgumentParser(prog="anima-ft verify", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="shard directories, globs or .tar files, or URLs of them (s3://, gs://, "
                   "https://)")
    p.add_argument("--index-only", action="store_true", help="check indices and sizes only (no sample reads)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show a bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show a bar")
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return 0 if exit_.code == 0 else 2
    try:
        report = verify(args.paths, args.index_only, args.progress)
    except (ValueError, RuntimeError) as err:  # RuntimeError: a store that cannot be reached
        print(f"anima-ft verify: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=1) if args.json else format_report(report))
    return 1 if report.problems else 0
