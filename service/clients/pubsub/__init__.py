"""Pub/Sub: the per-loop gRPC clients, the batching publisher and the streaming pull."""
