"""The ``data.remote`` section: how shards named by URL (``s3://``, ``gs://``, ``https://``) are read.

Credentials and endpoints are never part of the config: they come from the storage library's own environment and
config files (for S3 the ``AWS_*`` variables, ``~/.aws/config``; ``AWS_ENDPOINT_URL`` for S3-compatible stores).
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import bounded


@dataclass
class RemoteConfig:
    """Reading shards from object storage (see docs/data.md#shards-in-object-storage)."""

    prefetch_samples: int = bounded(32, 1)
    """Samples fetched ahead per loader process (requests in flight or ready); memory is about this x sample size."""
    requests_in_flight: int = bounded(0, 0, note="0 = prefetch_samples")
    """Of those, at most this many requests in flight at once (0: all of them); below ``prefetch_samples``, samples
    that arrive before the consumer takes them wait in the other slots while the next requests go on
    (docs/data.md#remote-throughput)."""
    max_attempts: int = bounded(6, 1)
    """Tries of one request (the first plus retries) on transient errors: 5xx, throttling, resets, timeouts, short bodies."""
    retry_backoff_s: float = bounded(0.25, 0)
    """Wait before the first retry; each further retry doubles it (up to ``retry_backoff_max_s``), with +-50% jitter."""
    retry_backoff_max_s: float = bounded(8.0, 0)
    """Longest wait between two tries of one request."""
    request_timeout_s: float = bounded(60.0, 0, lo_open=True)
    """Connect and read timeout of one request, in seconds."""
    unreachable_after_failures: int = bounded(3, 1)
    """A bucket (or host) whose requests fail this many times in a row after all their tries, with no success in
    between, is unreachable: reading stops with an error naming it (after at most this x max_attempts x
    (request_timeout_s + retry_backoff_max_s) seconds)."""
    cache_dir: str = ""
    """Local directory for whole-shard copies of remote shards, read instead of the store in later epochs and runs;
    empty = no cache."""
    cache_max_gb: float = bounded(0.0, 0, note="0 = no cache")
    """Size cap of ``cache_dir`` in GiB; least recently used shards are removed first. Needed when cache_dir is set."""

    @property
    def requests_at_once(self) -> int:
        """The requests a prefetch pool keeps in flight: ``requests_in_flight``, or ``prefetch_samples`` when 0."""
        return self.requests_in_flight or self.prefetch_samples


def check_remote(cfg: RemoteConfig, key: str = "data.remote") -> None:
    """Raise ValueError naming the field for cache settings that do not go together."""
    if cfg.cache_dir and cfg.cache_max_gb <= 0:
        raise ValueError(f"{key}.cache_dir={cfg.cache_dir!r} is set but {key}.cache_max_gb={cfg.cache_max_gb}; give "
                         f"the cache's size cap in GiB (e.g. {key}.cache_max_gb=200) or clear {key}.cache_dir")
    if cfg.cache_max_gb > 0 and not cfg.cache_dir:
        raise ValueError(f"{key}.cache_max_gb={cfg.cache_max_gb} is set but {key}.cache_dir is empty; name the "
                         "local cache directory or set cache_max_gb=0")
    if cfg.requests_in_flight > cfg.prefetch_samples:
        raise ValueError(f"{key}.requests_in_flight={cfg.requests_in_flight} is above {key}.prefetch_samples="
                         f"{cfg.prefetch_samples}; requests in flight are part of the samples fetched ahead: raise "
                         f"prefetch_samples or lower requests_in_flight (0 = prefetch_samples)")
    if cfg.retry_backoff_max_s < cfg.retry_backoff_s:
        raise ValueError(f"{key}.retry_backoff_max_s={cfg.retry_backoff_max_s} is below {key}.retry_backoff_s="
                         f"{cfg.retry_backoff_s}; make the cap at least the first wait")
