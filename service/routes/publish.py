"""Publishing: Pub/Sub's REST publish call, answered once Pub/Sub has the messages.

Served at ``/v1/topics/{topic}:publish`` and at Pub/Sub's own path,
``/v1/projects/{project}/topics/{topic}:publish``, so an existing Pub/Sub REST client publishes
through loopgate by pointing its API root here.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from quart import Blueprint
from quart_schema import document_response, validate_request

from .. import metrics
from ..auth import requires
from ..clients import get_publisher
from ..clients.publisher import RAW_MESSAGE
from ..errors import ErrorResponse, InvalidArgument, NotFound, ServiceError, TopicNotFound
from ..limits import publish_limited
from ..registry import current_settings

blueprint = Blueprint("publish", __name__)

MAX_MESSAGES = 1000
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_ORDERING_KEY_BYTES = 1024
TOPIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


class Message(BaseModel):
    """A Pub/Sub message as in Pub/Sub's REST API."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(default=None, description="The payload, base64-encoded.")
    attributes: dict[str, str] | None = Field(default=None, max_length=MAX_ATTRIBUTES)
    orderingKey: str | None = Field(default=None, description="Messages of one key keep order.")
    # Output-only fields of Pub/Sub's message; accepted and ignored, as Pub/Sub does.
    messageId: str | None = None
    publishTime: str | None = None

    @field_validator("data")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("data is not valid base64") from None
        return value

    @field_validator("attributes")
    @classmethod
    def _attribute_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if not key:
                raise ValueError("attribute keys must not be empty")
            if len(key.encode()) > MAX_ATTRIBUTE_KEY_BYTES:
                raise ValueError(f"attribute key longer than {MAX_ATTRIBUTE_KEY_BYTES} bytes")
            if key.startswith("goog"):
                raise ValueError("attribute keys starting with 'goog' are reserved")
            if len(item.encode()) > MAX_ATTRIBUTE_VALUE_BYTES:
                raise ValueError(
                    f"value of attribute {key[:40]!r} longer than {MAX_ATTRIBUTE_VALUE_BYTES} bytes"
                )
        return value

    @field_validator("orderingKey")
    @classmethod
    def _ordering_key_size(cls, value: str | None) -> str | None:
        if value and len(value.encode()) > MAX_ORDERING_KEY_BYTES:
            raise ValueError(f"orderingKey longer than {MAX_ORDERING_KEY_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Message:
        if not self.data and not self.attributes:
            raise ValueError("a message needs non-empty data or at least one attribute")
        return self

    def to_raw(self) -> Any:
        return RAW_MESSAGE(
            data=base64.b64decode(self.data) if self.data else b"",
            attributes=self.attributes or {},
            ordering_key=self.orderingKey or "",
        )


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


class PublishResponse(BaseModel):
    messageIds: list[str]


Error = ErrorResponse


def check_topic(topic: str) -> None:
    """Validate a topic's short name and the allowlist.

    Raises:
        InvalidArgument: the name breaks Pub/Sub's rules.
        TopicNotFound: the topic is not in ``LOOPGATE_TOPICS``.
    """
    if not TOPIC_NAME.fullmatch(topic) or topic.startswith("goog"):
        raise InvalidArgument(
            f"invalid topic name {topic[:300]!r}: 3-255 characters, starting with a letter, of "
            "letters, digits and - _ . ~ + %, not starting with 'goog'"
        )
    if not current_settings().topic_allowed(topic):
        raise TopicNotFound(topic, reason="is not served here")


async def _publish(topic: str, body: PublishRequest) -> dict[str, list[str]]:
    check_topic(topic)
    try:
        messages = [message.to_raw() for message in body.messages]
        publisher = await get_publisher()
        ids = await publisher.publish(current_settings().topic_path(topic), messages)
    except ServiceError as exc:
        metrics.PUBLISH_REQUESTS.labels(outcome=type(exc).__name__).inc()
        raise
    metrics.PUBLISH_REQUESTS.labels(outcome="ok").inc()
    return {"messageIds": ids}


@blueprint.post("/v1/topics/<topic>:publish")
@requires("publish", "topic")
@publish_limited
@validate_request(PublishRequest)
@document_response(PublishResponse, 200)
@document_response(Error, 400)
@document_response(Error, 404)
@document_response(Error, 413)
@document_response(Error, 429)
@document_response(Error, 503)
async def publish(topic: str, data: PublishRequest) -> dict[str, list[str]]:
    """Publish messages to a topic; answers the message ids in request order."""
    return await _publish(topic, data)


@blueprint.post("/v1/projects/<project>/topics/<topic>:publish")
@requires("publish", "topic")
@publish_limited
@validate_request(PublishRequest)
@document_response(PublishResponse, 200)
@document_response(Error, 400)
@document_response(Error, 404)
@document_response(Error, 413)
@document_response(Error, 429)
@document_response(Error, 503)
async def publish_project(project: str, topic: str, data: PublishRequest) -> dict[str, list[str]]:
    """Pub/Sub's own REST path, for existing Pub/Sub clients."""
    if project != current_settings().project:
        raise NotFound(f"project {project!r} is not served here", resource=project)
    return await _publish(topic, data)
