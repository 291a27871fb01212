"""Flask, one Pub/Sub client per request: the common pattern of a well-known Stack Overflow answer.

The client is created on ``flask.g`` when a request first needs it and closed in
``teardown_request``, so every request pays for a new client (and its gRPC channel). Served by
gunicorn with threads::

    gunicorn --workers 2 --threads 64 bench.apps.flask_per_request:app
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g, jsonify, request
from flask.typing import ResponseReturnValue
from google.cloud import pubsub_v1

from .common import payloads, topic_path

app = Flask(__name__)


def get_publisher() -> pubsub_v1.PublisherClient:
    """This request's client, created on first use."""
    if "publisher" not in g:
        g.publisher = pubsub_v1.PublisherClient()
    publisher: pubsub_v1.PublisherClient = g.publisher
    return publisher


@app.teardown_request
def close_publisher(_: BaseException | None) -> None:
    publisher = g.pop("publisher", None)
    if publisher is not None:
        publisher.stop()
        publisher.transport.close()


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
