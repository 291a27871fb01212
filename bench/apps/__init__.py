"""The peer servers the benchmarks measure loopgate against.

The publish peers (``flask_*``, ``fastapi_*``, ``quart_noop*``) each speak loopgate's publish call
(``POST /v1/topics/{topic}:publish`` with ``{"messages": [{"data": "<base64>"}]}``, answered with
``{"messageIds": [...]}``) so one load script drives them all; they read ``BENCH_PROJECT`` and
``PUBSUB_EMULATOR_HOST`` from the environment. The storage peer (``storage_proxy``) speaks
loopgate's object GET and PUT and reads ``STORAGE_EMULATOR_HOST``.
"""
