"""Publishing: Pub/Sub's REST publish call, answered once Pub/Sub has the messages.

Served at ``/v1/topics/{topic}:publish`` and at Pub/Sub's own path,
``/v1/projects/{project}/topics/{topic}:publish``, so an existing Pub/Sub REST client publishes
through loopgate by pointing its API root here.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import re
import sys
from binascii import a2b_base64
from collections.abc import Awaitable, Callable
from typing import Annotated, NotRequired

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from quart import Blueprint, Response, request
from quart_schema import document_request, document_response
from werkzeug.exceptions import RequestTimeout

from .. import metrics, tracing
from ..auth.access import requires
from ..auth.limits import publish_limited
from ..clients import get_publisher
from ..clients.pubsub.messages import OutgoingMessage
from ..config import Settings, current_settings
from ..errors import (
    ErrorResponse,
    InvalidArgument,
    NotFound,
    ServiceError,
    TopicNotFound,
    describe_validation_error,
)

# pydantic reads typing's TypedDict only from Python 3.12, and quart-schema recognises only
# typing's from 3.12 on (it checks with typing.is_typeddict there): each version gets the one
# both read.
if sys.version_info >= (3, 12):
    from typing import TypedDict
else:
    from typing_extensions import TypedDict

blueprint = Blueprint("publish", __name__)

MAX_MESSAGES = 1000
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_ORDERING_KEY_BYTES = 1024
TOPIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


@with_config(ConfigDict(extra="forbid"))
class Message(TypedDict):
    """A Pub/Sub message as in Pub/Sub's REST API."""

    data: NotRequired[Annotated[str | None, Field(description="The payload, base64-encoded.")]]
    attributes: NotRequired[Annotated[dict[str, str] | None, Field(max_length=MAX_ATTRIBUTES)]]
    orderingKey: NotRequired[
        Annotated[str | None, Field(description="Messages of one key keep order.")]
    ]
    # Output-only fields of Pub/Sub's message; accepted and ignored, as Pub/Sub does.
    messageId: NotRequired[str | None]
    publishTime: NotRequired[str | None]


@with_config(ConfigDict(extra="forbid"))
class PublishRequest(TypedDict):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


# Typed dicts rather than models: validating into plain dicts takes about half the time of
# building a model per message, which matters at a thousand messages per request.
REQUEST_ADAPTER: TypeAdapter[PublishRequest] = TypeAdapter(PublishRequest)


def to_outgoing(body: PublishRequest) -> list[OutgoingMessage]:
    """Check what the schema cannot express and decode the messages, in one pass.

    Raises:
        InvalidArgument: naming the first bad field, as ``messages.<i>.<field>``.
    """
    outgoing: list[OutgoingMessage] = []
    append = outgoing.append
    for index, message in enumerate(body["messages"]):
        encoded = message.get("data")
        data = b""
        if encoded:
            try:
                # What base64.b64decode(validate=True) does, without its checks of the argument.
                data = a2b_base64(encoded, strict_mode=True)
            except (binascii.Error, ValueError):
                raise _invalid(index, "data", "not valid base64") from None
        attributes = message.get("attributes")
        if attributes:
            _check_attributes(index, attributes)
        elif not data:
            raise _invalid(index, None, "a message needs non-empty data or at least one attribute")
        ordering_key = message.get("orderingKey") or ""
        if ordering_key and _utf8_longer(ordering_key, MAX_ORDERING_KEY_BYTES):
            raise _invalid(index, "orderingKey", f"longer than {MAX_ORDERING_KEY_BYTES} bytes")
        append(OutgoingMessage(data, attributes or None, ordering_key))
    return outgoing


def _check_attributes(index: int, attributes: dict[str, str]) -> None:
    for key, value in attributes.items():
        if not key:
            raise _invalid(index, "attributes", "keys must not be empty")
        if _utf8_longer(key, MAX_ATTRIBUTE_KEY_BYTES):
            raise _invalid(index, "attributes", f"key longer than {MAX_ATTRIBUTE_KEY_BYTES} bytes")
        if key.startswith("goog"):
            raise _invalid(index, "attributes", "keys starting with 'goog' are reserved")
        if _utf8_longer(value, MAX_ATTRIBUTE_VALUE_BYTES):
            raise _invalid(
                index,
                f"attributes.{key[:40]}",
                f"value longer than {MAX_ATTRIBUTE_VALUE_BYTES} bytes",
            )


def _utf8_longer(text: str, limit: int) -> bool:
    """Whether ``text`` takes more than ``limit`` bytes in UTF-8 (at most 4 per character)."""
    return len(text) * 4 > limit and len(text.encode()) > limit


def _invalid(index: int, field: str | None, problem: str) -> InvalidArgument:
    where = f"messages.{index}" + (f".{field}" if field else "")
    return InvalidArgument(f"invalid request: {where}: {problem}")


class PublishResponse(BaseModel):
    messageIds: list[str]


Error = ErrorResponse


def check_topic(topic: str, settings: Settings | None = None) -> None:
    """Validate a topic's short name and the allowlist (of ``settings``, by default the current
    app's).

    Raises:
        InvalidArgument: the name breaks Pub/Sub's rules.
        TopicNotFound: the topic is not in ``LOOPGATE_TOPICS``.
    """
    if not TOPIC_NAME.fullmatch(topic) or topic.startswith("goog"):
        raise InvalidArgument(
            f"invalid topic name {topic[:300]!r}: 3-255 characters, starting with a letter, of "
            "letters, digits and - _ . ~ + %, not starting with 'goog'"
        )
    if not (settings if settings is not None else current_settings()).topic_allowed(topic):
        raise TopicNotFound(topic, reason="is not served here")


_OK = metrics.PUBLISH_REQUESTS.labels(outcome="ok")


async def _body() -> bytes:
    """The request's body, within Quart's body timeout.

    The same as ``request.get_data()`` without the task that ``asyncio.wait_for`` starts for
    every call: this is the hottest path of the service.
    """
    try:
        async with asyncio.timeout(request.body_timeout):
            data: bytes = await request.body
    except TimeoutError:
        raise RequestTimeout() from None
    return data


async def _publish(topic: str) -> Response:
    traced = tracing.current()  # None unless the app traces (service/tracing.py)
    if traced is None:
        return await _publish_messages(topic, None)
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    with traced.request_span(request.headers, rule, topic):
        return await _publish_messages(topic, traced)


async def _publish_messages(topic: str, traced: tracing.Tracing | None) -> Response:
    settings = current_settings()  # once: each lookup goes through the app's client registry
    check_topic(topic, settings)
    try:
        # Validated straight from the bytes by pydantic-core: no separate JSON parse.
        body = REQUEST_ADAPTER.validate_json(await _body())
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc)) from None
    messages = to_outgoing(body)
    path = settings.topic_path(topic)
    trace = None if traced is None else traced.start_creates(path, messages)
    try:
        publisher = await get_publisher()
        ids = await publisher.publish(path, messages, trace)
    except BaseException as exc:
        if trace is not None:
            trace.end(error=exc)
        if isinstance(exc, ServiceError):
            metrics.PUBLISH_REQUESTS.labels(outcome=type(exc).__name__).inc()
        raise
    if trace is not None:
        trace.end(ids)
    _OK.inc()
    return Response(json.dumps({"messageIds": ids}), content_type="application/json")


def _documented(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    for code, model in (
        (200, PublishResponse),
        (400, Error),
        (404, Error),
        (413, Error),
        (429, Error),
        (503, Error),
    ):
        route = document_response(model, code)(route)
    return document_request(PublishRequest)(route)


@blueprint.post("/v1/topics/<topic>:publish")
@requires("publish", "topic")
@publish_limited
@_documented
async def publish(topic: str) -> Response:
    """Publish messages to a topic; answers the message ids in request order."""
    return await _publish(topic)


@blueprint.post("/v1/projects/<project>/topics/<topic>:publish")
@requires("publish", "topic")
@publish_limited
@_documented
async def publish_project(project: str, topic: str) -> Response:
    """Pub/Sub's own REST path, for existing Pub/Sub clients."""
    if project != current_settings().project:
        raise NotFound(f"project {project!r} is not served here", resource=project)
    return await _publish(topic)
