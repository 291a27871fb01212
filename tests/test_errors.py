"""The error hierarchy and its one mapping: HTTP status, canonical names, headers, close codes."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import TypeAdapter, ValidationError
from quart import Quart
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import MethodNotAllowed, RequestEntityTooLarge
from werkzeug.exceptions import NotFound as HTTPNotFound

from service import errors
from service.clients.storage.signing import SigningUnavailable
from service.error_responses import close_frame, error_response, register_error_handlers
from service.errors import (
    CANONICAL_STATUS,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    BackendError,
    BodyStalled,
    ClientDisconnected,
    Forbidden,
    InvalidArgument,
    NotFound,
    NotReady,
    PayloadTooLarge,
    PermissionDenied,
    PreconditionFailed,
    PublisherOverloaded,
    RangeNotSatisfiable,
    RateLimited,
    RequestTimeout,
    ServiceError,
    StreamClosed,
    SubscriptionNotFound,
    TopicNotFound,
    Unauthenticated,
    Unavailable,
)
from service.loopclients import ClientUnavailable, ForeignLoopError


def _every_service_error() -> list[type[ServiceError]]:
    found, pending = [], [ServiceError]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


EXAMPLES: list[tuple[ServiceError, int, str]] = [
    (InvalidArgument("bad"), 400, "INVALID_ARGUMENT"),
    (ClientDisconnected("the client disconnected during the upload"), 400, "INVALID_ARGUMENT"),
    (Unauthenticated("who?"), 401, "UNAUTHENTICATED"),
    (Forbidden("no"), 403, "PERMISSION_DENIED"),
    (PermissionDenied("pubsub: no"), 403, "PERMISSION_DENIED"),
    (NotFound("gone", resource="x"), 404, "NOT_FOUND"),
    (TopicNotFound("t"), 404, "NOT_FOUND"),
    (SubscriptionNotFound("s"), 404, "NOT_FOUND"),
    (RequestTimeout("slow"), 408, "DEADLINE_EXCEEDED"),
    (BodyStalled(5), 408, "DEADLINE_EXCEEDED"),
    (PreconditionFailed("exists"), 412, "FAILED_PRECONDITION"),
    (PayloadTooLarge("big"), 413, "PAYLOAD_TOO_LARGE"),
    (RangeNotSatisfiable("out", size=3), 416, "OUT_OF_RANGE"),
    (RateLimited("slow down"), 429, "RESOURCE_EXHAUSTED"),
    (Unavailable("down"), 503, "UNAVAILABLE"),
    (PublisherOverloaded("full"), 503, "UNAVAILABLE"),
    (BackendError("pubsub", "down"), 503, "UNAVAILABLE"),
    (NotReady("down", clients={}), 503, "UNAVAILABLE"),
    (SigningUnavailable("no signer"), 503, "UNAVAILABLE"),
]


def test_every_error_class_has_an_example() -> None:
    assert {type(error) for error, _, _ in EXAMPLES} == set(_every_service_error()) - {ServiceError}


def test_every_error_class_uses_the_canonical_name_of_its_status() -> None:
    for kind in _every_service_error():
        assert CANONICAL_STATUS[kind.status_code] == kind.status, kind


@pytest.mark.parametrize(("error", "code", "status"), EXAMPLES, ids=lambda v: repr(v))
def test_status_and_body(error: ServiceError, code: int, status: str) -> None:
    body, answered, _ = error_response(error)
    assert answered == error.status_code == code
    assert body["error"] == {"code": code, "status": status, "message": error.message}


def test_the_registrys_errors_are_a_503_and_a_silent_500() -> None:
    body, status, headers = error_response(ClientUnavailable("pubsub", "down", retry_after=2.5))
    assert (status, headers) == (503, {"Retry-After": "3"})
    assert body["error"] == {
        "code": 503,
        "status": "UNAVAILABLE",
        "message": "client 'pubsub' is unavailable: down",
    }
    body, status, headers = error_response(ForeignLoopError("pubsub"))
    assert (status, body["error"]["message"], headers) == (500, "internal error", {})


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.2, "2"), (2.0, "2"), (59.5, "60")],
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    seconds: float, header: str
) -> None:
    for error in (Unavailable("down", retry_after=seconds), RateLimited("x", retry_after=seconds)):
        assert error_response(error)[2] == {"Retry-After": header}


def test_no_retry_after_on_client_errors() -> None:
    assert "Retry-After" not in InvalidArgument("bad").headers()
    assert "Retry-After" not in PermissionDenied("no").headers()


def test_unauthenticated_challenges_with_bearer() -> None:
    assert Unauthenticated("missing credentials").headers() == {
        "WWW-Authenticate": 'Bearer realm="loopgate"'
    }
    invalid = Unauthenticated('bad "token"\\\n', error="invalid_token")
    assert invalid.headers() == {
        "WWW-Authenticate": 'Bearer realm="loopgate", error="invalid_token", '
        'error_description="bad token"'
    }


def test_forbidden_names_the_missing_scope() -> None:
    assert Forbidden("origin refused").headers() == {}
    assert Forbidden("lacks it", scope="publish:orders").headers() == {
        "WWW-Authenticate": 'Bearer realm="loopgate", error="insufficient_scope", '
        'scope="publish:orders"'
    }


def test_request_timeouts_close_the_connection() -> None:
    stalled = BodyStalled(2.5)
    assert stalled.message == "the client sent nothing of the body for 2.5s"
    assert stalled.idle_timeout == 2.5
    assert isinstance(stalled, RequestTimeout)
    assert error_response(stalled)[2] == {"Connection": "close"}


def test_range_not_satisfiable_names_the_size() -> None:
    assert RangeNotSatisfiable("out", size=42).headers() == {"Content-Range": "bytes */42"}


def test_not_ready_names_every_client_beside_the_error() -> None:
    clients = {"publisher": "down: refused", "http": "ok"}
    body, status, headers = error_response(NotReady("publisher down", clients=clients))
    assert status == 503
    assert body == {
        "error": {"code": 503, "status": "UNAVAILABLE", "message": "publisher down"},
        "clients": clients,
    }
    assert headers == {"Retry-After": "1"}


def test_schema_and_decoding_errors_are_400() -> None:
    try:
        TypeAdapter(int).validate_python("x")
    except ValidationError as exc:
        invalid = exc
    body, status, headers = error_response(RequestSchemaValidationError(invalid))
    assert (status, headers) == (400, {})
    assert body["error"]["status"] == "INVALID_ARGUMENT"
    assert body["error"]["message"].startswith("invalid request: ")
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert error_response(undecodable) == (
        {
            "error": {
                "code": 400,
                "status": "INVALID_ARGUMENT",
                "message": "request body is not valid UTF-8",
            }
        },
        400,
        {},
    )


def test_http_errors_keep_their_code_and_allow_header() -> None:
    body, status, headers = error_response(HTTPNotFound())
    assert (status, headers, body["error"]["status"]) == (404, {}, "NOT_FOUND")
    body, status, headers = error_response(MethodNotAllowed(valid_methods=["GET", "HEAD"]))
    assert (status, headers) == (405, {"Allow": "GET, HEAD"})
    assert body["error"]["status"] == "METHOD_NOT_ALLOWED"
    body, status, _ = error_response(RequestEntityTooLarge(), max_body_bytes=1000)
    assert status == 413
    assert body["error"]["message"] == "request body larger than 1000 bytes"


def test_anything_else_is_500_without_its_detail() -> None:
    body, status, headers = error_response(ZeroDivisionError("secret detail"))
    assert (status, headers) == (500, {})
    assert body == {"error": {"code": 500, "status": "INTERNAL", "message": "internal error"}}


def test_close_codes() -> None:
    assert (CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION) == (1000, 1001, 1008)
    assert (CLOSE_INTERNAL_ERROR, CLOSE_TRY_AGAIN_LATER) == (1011, 1013)


@pytest.mark.parametrize(
    ("error", "frame"),
    [
        (StreamClosed(CLOSE_NORMAL, "idle timeout"), (1000, "idle timeout")),
        (StreamClosed(CLOSE_GOING_AWAY, "server shutting down"), (1001, "server shutting down")),
        (StreamClosed(1013, "slow consumer: queue full"), (1013, "slow consumer: queue full")),
        (Unavailable("the server is shutting down"), (1013, "the server is shutting down")),
        (BackendError("pubsub", "down"), (1013, "pubsub: down")),
        (RateLimited("too many streams"), (1013, "too many streams")),
        (Unauthenticated("invalid token", error="invalid_token"), (1008, "invalid token")),
        (Forbidden("origin refused"), (1008, "origin refused")),
        (InvalidArgument("bad name"), (1008, "bad name")),
        (TopicNotFound("t"), (1008, "topic 't' does not exist")),
        (ForeignLoopError("x"), (1011, "internal error")),
        (ClientUnavailable("publisher", "down"), (1013, "client 'publisher' is unavailable: down")),
        (ZeroDivisionError("secret detail"), (1011, "internal error")),
    ],
    ids=repr,
)
def test_close_frame(error: BaseException, frame: tuple[int, str]) -> None:
    assert close_frame(error) == frame


def test_close_reasons_fit_a_close_frame_without_splitting_a_character() -> None:
    code, reason = close_frame(Unavailable("é" * 100))
    assert code == CLOSE_TRY_AGAIN_LATER
    assert reason == "é" * 61  # 122 bytes: a 62nd would need 124


def test_errors_module_defines_each_close_code_once() -> None:
    codes = [value for name, value in vars(errors).items() if name.startswith("CLOSE_")]
    assert len(codes) == len(set(codes)) == 5


async def test_handlers_answer_json_with_the_mapping(caplog: pytest.LogCaptureFixture) -> None:
    app = Quart("errors-test")
    register_error_handlers(app)

    @app.get("/stalled")
    async def stalled() -> None:
        raise BodyStalled(1)

    @app.get("/boom")
    async def boom() -> None:
        raise ZeroDivisionError("secret detail")

    client = app.test_client()
    response = await client.get("/stalled")
    assert response.status_code == 408
    assert response.headers["Connection"] == "close"
    assert response.content_type == "application/json"
    assert json.loads(await response.get_data()) == {
        "error": {
            "code": 408,
            "status": "DEADLINE_EXCEEDED",
            "message": "the client sent nothing of the body for 1s",
        }
    }
    with caplog.at_level(logging.ERROR, logger="loopgate"):
        response = await client.get("/boom")
    assert response.status_code == 500
    assert "secret" not in (await response.get_data(as_text=True))
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    response = await client.post("/boom")
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
