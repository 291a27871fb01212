"""Benchmarks of loopgate against the usual alternatives; run with ``python -m bench.publish``."""
