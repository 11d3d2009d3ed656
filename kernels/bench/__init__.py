"""Benchmarks for kernels/ (not tests): gpu_check.py and its cases."""
