"""Direct transfers: V4 signed URLs and resumable upload sessions for big objects.

A request body through loopgate can be capped on the way (32 MiB for HTTP/1 on Cloud Run), so a
client moves a big object straight to or from Cloud Storage with what these routes answer:

* ``POST /v1/buckets/{bucket}/objects/{name}:signUrl`` with ``{"method": "GET"|"PUT",
  "expiresIn": seconds, "contentType": ...}``: a V4 signed URL for that one method on that one
  object, ``{"url", "method", "expires", "headers"}``; the request must send ``headers``. GET needs
  ``storage:read:BUCKET``, PUT ``storage:write:BUCKET``. The lifetime is at most
  ``LOOPGATE_SIGNED_URL_MAX_SECONDS`` (400 beyond); see :mod:`service.clients.storage.signing`.
* ``POST /v1/buckets/{bucket}/objects/{name}:startUpload`` with ``{"contentType", "size"}`` (both
  optional; ``storage:write:BUCKET``): ``{"sessionUrl"}``, a resumable upload session started for
  the client's ``Origin``; the client PUTs the bytes to it.

The body is validated first (400), then the caller's scope for the method asked (401, 403), then the
bucket and name (404, 400). With ``LOOPGATE_MAX_OBJECT_BYTES`` below its default, a signed PUT
carries an ``x-goog-content-length-range`` header and an upload session needs its ``size``, so
that the limit holds for direct uploads too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, request
from quart.blueprints import BlueprintSetupState
from quart_schema import document_response, security_scheme, validate_request

from ..auth.access import authorize, requires
from ..clients import get_storage
from ..clients.storage.names import check_bucket, check_name
from ..clients.storage.signing import SIGNER, sign_url
from ..clients.storage.upload_sessions import start_upload_session
from ..config import Settings, current_settings
from ..errors import ErrorResponse, InvalidArgument, PayloadTooLarge
from ..loopclients.context import EXTENSION_KEY
from .storage import OBJECT, ObjectNameConverter

blueprint = Blueprint("storage_signed", __name__)

DEFAULT_EXPIRES_IN = 900
DEFAULT_MAX_OBJECT_BYTES = Settings.model_fields["max_object_bytes"].default
# A header value: printable ASCII, not starting with a space.
HEADER_VALUE = r"^[\x21-\x7e][\x20-\x7e]*$"


@blueprint.record_once
def _setup(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault("object", ObjectNameConverter)
    state.app.extensions[EXTENSION_KEY].add(SIGNER)  # the loop's signer, made on first use


class SignUrlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["GET", "PUT"] = Field(description="The one method the URL allows.")
    expiresIn: int = Field(
        default=DEFAULT_EXPIRES_IN,
        ge=1,
        description="Seconds the URL is valid, at most LOOPGATE_SIGNED_URL_MAX_SECONDS "
        f"(default {DEFAULT_EXPIRES_IN}, or that maximum when lower).",
    )
    contentType: str | None = Field(
        default=None,
        max_length=256,
        pattern=HEADER_VALUE,
        description="PUT only: the Content-Type the upload must send (and the object gets).",
    )


class SignUrlResponse(BaseModel):
    url: str
    method: str
    expires: str = Field(description="RFC 3339, UTC.")
    headers: dict[str, str] = Field(description="Headers a request with the URL must send.")


class StartUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contentType: str | None = Field(default=None, max_length=256, pattern=HEADER_VALUE)
    size: int | None = Field(
        default=None, ge=0, description="The object's size: the upload must be exactly this long."
    )


class StartUploadResponse(BaseModel):
    sessionUrl: str = Field(description="PUT the bytes here (Cloud Storage's resumable protocol).")


def _lowered_limit(settings: Settings) -> int | None:
    """``LOOPGATE_MAX_OBJECT_BYTES`` when it is below its default (Cloud Storage's own limit)."""
    limit = settings.max_object_bytes
    return limit if limit < DEFAULT_MAX_OBJECT_BYTES else None


def _expires_in(data: SignUrlRequest, settings: Settings) -> int:
    longest = settings.signed_url_max_seconds
    if "expiresIn" not in data.model_fields_set:
        return min(DEFAULT_EXPIRES_IN, longest)
    if data.expiresIn > longest:
        raise InvalidArgument(
            f"invalid request: expiresIn: at most {longest} seconds here, not {data.expiresIn} "
            "(LOOPGATE_SIGNED_URL_MAX_SECONDS)"
        )
    return data.expiresIn


@blueprint.post(OBJECT + ":signUrl", merge_slashes=False)
@security_scheme([{"bearer": []}])
@document_response(SignUrlResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 401)
@document_response(ErrorResponse, 403)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 503)
@validate_request(SignUrlRequest)
async def sign_object_url(bucket: str, name: str, data: SignUrlRequest) -> SignUrlResponse:
    """A V4 signed URL for one method on one object, for a client to use directly."""
    await authorize("storage:read" if data.method == "GET" else "storage:write", bucket)
    check_bucket(bucket)
    check_name(name, request.scope.get("raw_path"))
    settings = current_settings()
    expires_in = _expires_in(data, settings)
    headers: dict[str, str] = {}
    if data.contentType is not None:
        if data.method != "PUT":
            raise InvalidArgument("invalid request: contentType: applies to PUT only")
        headers["Content-Type"] = data.contentType
    limit = _lowered_limit(settings)
    if data.method == "PUT" and limit is not None:
        headers["x-goog-content-length-range"] = f"0,{limit}"
    storage = await get_storage()
    signed = await sign_url(
        await SIGNER.get(),
        endpoint=storage.api_root,
        bucket=bucket,
        name=name,
        method=data.method,
        expires_in=expires_in,
        headers=headers,
    )
    return SignUrlResponse(
        url=signed.url,
        method=signed.method,
        expires=signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        headers=signed.headers,
    )


@blueprint.post(OBJECT + ":startUpload", merge_slashes=False)
@requires("storage:write", "bucket")
@document_response(StartUploadResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 413)
@document_response(ErrorResponse, 503)
@validate_request(StartUploadRequest)
async def start_upload(bucket: str, name: str, data: StartUploadRequest) -> StartUploadResponse:
    """Start a resumable upload session that the client then uploads to directly."""
    check_bucket(bucket)
    check_name(name, request.scope.get("raw_path"))
    settings = current_settings()
    if data.size is not None and data.size > settings.max_object_bytes:
        raise PayloadTooLarge(
            f"object of {data.size} bytes is larger than the limit of {settings.max_object_bytes}"
        )
    if data.size is None and _lowered_limit(settings) is not None:
        raise InvalidArgument(
            "invalid request: size: required here (objects are limited to "
            f"{settings.max_object_bytes} bytes)"
        )
    origin = request.headers.get("Origin")
    if origin is not None and not (
        len(origin) <= 1024 and origin.isascii() and origin.isprintable()
    ):
        raise InvalidArgument("invalid Origin header")
    storage = await get_storage()
    session_url = await start_upload_session(
        storage, bucket, name, content_type=data.contentType, size=data.size, origin=origin
    )
    return StartUploadResponse(sessionUrl=session_url)
