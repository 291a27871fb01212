"""Pub/Sub failures as the service's errors: every mapping, the backend's message kept."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc

from service.clients.pubsub.errors import translate
from service.errors import (
    BackendError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SubscriptionNotFound,
    TopicNotFound,
)


@pytest.mark.parametrize("topic", ["orders", "projects/p/topics/orders"])
def test_a_missing_topic_is_404_naming_its_short_name(topic: str) -> None:
    error = translate(gexc.NotFound("Resource not found (resource=orders)."), topic=topic)
    assert type(error) is TopicNotFound
    assert (error.status_code, error.status) == (404, "NOT_FOUND")
    assert error.topic == error.resource == "orders"
    assert error.message == "topic 'orders' does not exist"
    assert error.headers() == {}


@pytest.mark.parametrize("subscription", ["jobs", "projects/p/subscriptions/jobs"])
def test_a_missing_subscription_is_404_naming_it(subscription: str) -> None:
    error = translate(gexc.NotFound("gone"), subscription=subscription, topic="orders")
    assert type(error) is SubscriptionNotFound
    assert isinstance(error, NotFound)
    assert error.subscription == error.resource == "jobs"
    assert error.message == "subscription 'jobs' does not exist"


def test_not_found_without_a_named_resource_keeps_the_backend_message() -> None:
    error = translate(gexc.NotFound("Resource not found (resource=x)."))
    assert type(error) is NotFound
    assert error.status_code == 404
    assert error.message == "pubsub: Resource not found (resource=x)."


@pytest.mark.parametrize("kind", [gexc.PermissionDenied, gexc.Unauthenticated])
def test_a_refused_credential_is_403(kind: type[gexc.GoogleAPICallError]) -> None:
    error = translate(kind("User not authorized to perform this action."), topic="orders")
    assert type(error) is PermissionDenied
    assert (error.status_code, error.status) == (403, "PERMISSION_DENIED")
    assert error.message == "pubsub: User not authorized to perform this action."
    assert "Retry-After" not in error.headers()


def test_an_invalid_argument_is_400_with_the_backend_message() -> None:
    error = translate(gexc.InvalidArgument("Request payload size exceeds the limit"), topic="t")
    assert type(error) is InvalidArgument
    assert (error.status_code, error.status) == (400, "INVALID_ARGUMENT")
    assert error.message == "Request payload size exceeds the limit"


@pytest.mark.parametrize(
    "kind",
    [
        gexc.ServiceUnavailable,
        gexc.DeadlineExceeded,
        gexc.ResourceExhausted,
        gexc.InternalServerError,
        gexc.Aborted,
        gexc.Unknown,
        gexc.FailedPrecondition,
        gexc.AlreadyExists,
        gexc.Cancelled,
    ],
)
def test_every_other_failure_is_503_with_retry_after(kind: type[gexc.GoogleAPICallError]) -> None:
    error = translate(kind("backend says no"), topic="orders", subscription="jobs")
    assert type(error) is BackendError
    assert (error.status_code, error.status) == (503, "UNAVAILABLE")
    assert error.backend == "pubsub"
    assert error.message == "pubsub: backend says no"
    assert error.headers() == {"Retry-After": "1"}


def test_a_call_error_without_a_message_is_described_by_its_text() -> None:
    error = translate(gexc.ServiceUnavailable(""))
    assert error.message == f"pubsub: {gexc.ServiceUnavailable('')}"


def test_exhausted_retries_are_503_naming_the_operation_its_deadline_and_the_last_error() -> None:
    exhausted = gexc.RetryError("Timeout of 30.0s exceeded", gexc.ServiceUnavailable("down"))
    error = translate(exhausted, topic="orders", operation="publish", timeout=30.0)
    assert type(error) is BackendError
    assert error.headers() == {"Retry-After": "1"}
    assert error.message == "pubsub: publish did not succeed within 30s: 503 down"


def test_exhausted_retries_without_a_cause_or_a_deadline() -> None:
    exhausted = gexc.RetryError("Unknown error", None)
    error = translate(exhausted)
    assert type(error) is BackendError
    assert error.message == f"pubsub: the call did not succeed before its deadline: {exhausted}"
