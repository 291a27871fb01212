"""The peer servers the publish benchmark measures loopgate against.

Each speaks loopgate's publish call (``POST /v1/topics/{topic}:publish`` with
``{"messages": [{"data": "<base64>"}]}``, answered with ``{"messageIds": [...]}``) so one load
script drives them all. They read ``BENCH_PROJECT`` and ``PUBSUB_EMULATOR_HOST`` from the
environment.
"""
