"""Cloud Storage failures as the service's errors: one mapping, the backend's message kept."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from service.clients.storage.errors import backend_message, from_status, translate
from service.errors import (
    BackendError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RangeNotSatisfiable,
    Unavailable,
)


def response_error(status: int, body: str) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL("http://storage/x"), "GET", CIMultiDictProxy(CIMultiDict()))
    return aiohttp.ClientResponseError(info, (), status=status, message=f"Reason: {body}")


def test_the_backend_message_is_taken_from_googles_error_body() -> None:
    body = '{"error": {"code": 403, "message": "caller lacks storage.objects.get"}}'
    assert backend_message(body) == "caller lacks storage.objects.get"
    assert backend_message("  plain text  ") == "plain text"
    assert len(backend_message("x" * 2000)) == 500


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, InvalidArgument),
        (401, PermissionDenied),
        (403, PermissionDenied),
        (404, NotFound),
        (412, PreconditionFailed),
        (416, RangeNotSatisfiable),
        (429, BackendError),
        (500, BackendError),
        (503, BackendError),
    ],
)
def test_every_status_has_one_error(status: int, kind: type[Exception]) -> None:
    error = from_status(status, "the backend's words", "b", "o")
    assert type(error) is kind
    assert "the backend's words" in error.message


def test_a_missing_bucket_and_a_missing_object_are_told_apart() -> None:
    missing_object = from_status(404, "", "b", "o")
    missing_bucket = from_status(404, "The specified bucket does not exist.", "b", "o")
    assert isinstance(missing_object, NotFound) and isinstance(missing_bucket, NotFound)
    assert (missing_object.resource, missing_bucket.resource) == ("o", "b")
    assert from_status(404, "Not Found", "b", "o").message == "object 'o' not found in bucket 'b'"


def test_retryable_answers_carry_retry_after() -> None:
    assert from_status(503, "busy", "b", None).headers() == {"Retry-After": "1"}


def test_translate_raises_the_mapped_error_from_the_backends() -> None:
    with pytest.raises(PreconditionFailed) as caught, translate("b", "o"):
        raise response_error(412, '{"error": {"message": "generation mismatch"}}')
    assert caught.value.message == "generation mismatch"
    assert isinstance(caught.value.__cause__, aiohttp.ClientResponseError)


@pytest.mark.parametrize(
    "failure",
    [
        aiohttp.ConnectionTimeoutError(),
        TimeoutError(),
        aiohttp.ClientConnectionError("refused"),
        ConnectionResetError("reset by peer"),
    ],
    ids=repr,
)
def test_an_unreachable_backend_is_503(failure: Exception) -> None:
    with pytest.raises(Unavailable) as caught, translate("b", "o"):
        raise failure
    assert caught.value.status_code == 503
    assert caught.value.headers() == {"Retry-After": "1"}
    assert caught.value.message.startswith("storage: ")
