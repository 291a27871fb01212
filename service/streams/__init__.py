"""Subscribers: the per-worker fan-out hub, subscriber queues and frames, and queue mode."""
