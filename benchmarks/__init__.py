"""Benchmarks of the prefix attention backends and, later, end-to-end runs (run from the repo root)."""
