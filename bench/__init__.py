"""Benchmarks of loopgate; run one with ``python -m bench.<name>``."""
