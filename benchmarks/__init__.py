"""Measurements against peers (not tests). Run: ``python -m benchmarks.<name>``."""
