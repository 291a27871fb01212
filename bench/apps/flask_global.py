"""Flask with one process-wide Pub/Sub client, created lazily under a lock.

The client is created on first use (after gunicorn forks its workers, so gRPC is never shared
across a fork) and used by every request thread; each request blocks on ``publish().result()``::

    gunicorn --workers 2 --threads 64 bench.apps.flask_global:app
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from google.cloud import pubsub_v1

from .common import payloads, topic_path

app = Flask(__name__)

_lock = threading.Lock()
_publisher: pubsub_v1.PublisherClient | None = None


def get_publisher() -> pubsub_v1.PublisherClient:
    """The process's client, created by the first request that needs it."""
    global _publisher
    if _publisher is None:
        with _lock:
            if _publisher is None:
                _publisher = pubsub_v1.PublisherClient()
    return _publisher


@app.post("/v1/topics/<topic>:publish")
def publish(topic: str) -> ResponseReturnValue:
    """Publish the request's messages and wait for their ids."""
    try:
        data = payloads(request.get_json())
    except (ValueError, KeyError, TypeError) as exc:
        return jsonify(error=str(exc)), 400
    publisher = get_publisher()
    futures: list[Any] = [publisher.publish(topic_path(topic), item) for item in data]
    return jsonify(messageIds=[future.result(timeout=30) for future in futures])
