"""Benchmarks (results in docs/BENCHMARKS.md)."""
