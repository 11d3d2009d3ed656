"""Logging setup, metrics.jsonl / wandb writer and throughput estimates."""

from .metrics import MetricsWriter, read_metrics, setup_logging, train_flops_per_sample

__all__ = ["MetricsWriter", "read_metrics", "setup_logging", "train_flops_per_sample"]
