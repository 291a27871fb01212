"""V4 signed URLs for Cloud Storage objects, signed with a service-account key or through IAM.

How, and why so:

* google-cloud-storage's V4 signer (``_signing.generate_signed_url_v4``, the function that
  ``Blob.generate_signed_url(version="v4")`` calls) builds the canonical request, the string to
  sign and the URL. Its only I/O is the signature, and that is the part loopgate cannot leave to
  it: without a key it calls IAM's ``signBlob`` synchronously through ``requests``, which would
  block the event loop. So it runs with a stand-in credential that records the string to sign and
  signs nothing; loopgate then signs that string itself, asynchronously, and fills in the URL's
  last parameter, ``X-Goog-Signature``. :class:`KeySigner` signs with the key of a service-account
  key file (in process, no I/O); :class:`IamSigner` calls ``signBlob`` over the loop's aiohttp
  session. RSA PKCS#1 v1.5 signatures are deterministic, so the URL is byte for byte the one
  google-cloud-storage makes with the same key at the same time.
* gcloud-aio-storage's ``Blob.get_signed_url`` (async, and already a dependency) is not used: it
  lower-cases header values in the canonical request (a signed ``Content-Type`` such as
  ``text/plain; charset=UTF-8`` then fails to verify), reads its host from
  ``STORAGE_EMULATOR_HOST`` once at import and puts ``https://`` before it, ignores the status of
  IAM's answer, and its IAM endpoint cannot be changed.
* One private seam: ``_request_timestamp`` of ``generate_signed_url_v4`` sets the request's time
  (so tests can freeze it). It is looked up at import (:data:`TIMESTAMP_SEAM`); without it the
  library's own clock is used. Either way the ``expires`` answered is read back from the URL's
  ``X-Goog-Date``, so it always agrees with the URL.

Which signer (:func:`create_signer`, once per event loop): a service-account key file named by
``GOOGLE_APPLICATION_CREDENTIALS`` signs locally, unless ``LOOPGATE_SIGNING_SERVICE_ACCOUNT`` names
another account. Otherwise IAM signs as ``LOOPGATE_SIGNING_SERVICE_ACCOUNT`` or, by default, as the
runtime's own service account (Cloud Run, GKE: the metadata server's), with the access token of
Application Default Credentials; that account needs ``roles/iam.serviceAccountTokenCreator`` on the
signing account (on itself, by default). With ``STORAGE_EMULATOR_HOST`` set no Google credentials
are used: IAM is called without a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import google.auth.credentials
from google.cloud.storage import _signing
from google.oauth2 import service_account

from ...config import current_settings
from ...errors import BackendError, PermissionDenied, Unavailable
from ...loopclients import ClientSpec
from ..http_session import HTTP
from ..pubsub.specs import CREDENTIALS
from .errors import backend_message

log = logging.getLogger("loopgate.storage")

IAM = "IAM signBlob"
RETRY_AFTER = 1.0
SIGNATURE_PARAM = "&X-Goog-Signature="
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
TIMESTAMP_SEAM = (
    "_request_timestamp" in inspect.signature(_signing.generate_signed_url_v4).parameters
)
if not TIMESTAMP_SEAM:
    log.warning(
        "google-cloud-storage's V4 signer takes no _request_timestamp: signed URLs use its clock"
    )


class Signer(Protocol):
    """Signs strings as one service account (RSA-SHA256)."""

    @property
    def email(self) -> str: ...

    async def sign(self, message: bytes) -> bytes: ...


class KeySigner:
    """Signs with the private key of a service-account key file, in process."""

    def __init__(self, credentials: service_account.Credentials) -> None:
        self.credentials = credentials

    @property
    def email(self) -> str:
        return str(self.credentials.service_account_email)

    async def sign(self, message: bytes) -> bytes:
        # One RSA-2048 signature takes well under a millisecond: not worth a thread.
        return bytes(self.credentials.sign_bytes(message))


TokenSource = Callable[[], Awaitable[str | None]]


async def no_token() -> str | None:
    return None


@dataclass
class IamSigner:
    """Signs through the IAM Credentials API's ``signBlob``, over the loop's aiohttp session.

    Args:
        session: the loop's shared session.
        endpoint: the API's base URL (``LOOPGATE_IAM_ENDPOINT``).
        email: the service account that signs.
        token: returns the access token to send, or ``None`` to send none.
        timeout: bounds the call.
    """

    session: aiohttp.ClientSession
    endpoint: str
    email: str
    token: TokenSource = no_token
    timeout: aiohttp.ClientTimeout = field(
        default_factory=lambda: aiohttp.ClientTimeout(total=30, connect=10)
    )

    async def sign(self, message: bytes) -> bytes:
        """The signature of ``message``.

        Raises:
            PermissionDenied: IAM refused (the signing role is missing).
            BackendError, Unavailable: IAM failed or did not answer (503).
        """
        account = quote(self.email, safe="@")
        url = f"{self.endpoint.rstrip('/')}/v1/projects/-/serviceAccounts/{account}:signBlob"
        headers = {"Content-Type": "application/json"}
        token = await self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps({"payload": base64.b64encode(message).decode()})
        try:
            async with self.session.post(
                url, data=body, headers=headers, timeout=self.timeout
            ) as response:
                status, text = response.status, await response.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise Unavailable(f"{IAM}: unreachable: {detail}", retry_after=RETRY_AFTER) from exc
        if status in (401, 403):
            raise PermissionDenied(
                f"{IAM}: refused to sign as {self.email}: {backend_message(text)} (the service "
                "account loopgate runs as needs roles/iam.serviceAccountTokenCreator on it)"
            )
        if status >= 400:
            raise BackendError(IAM, f"HTTP {status}: {backend_message(text)}")
        try:
            return base64.b64decode(json.loads(text)["signedBlob"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise BackendError(IAM, "the answer holds no signedBlob") from None


@dataclass(frozen=True)
class SignedUrl:
    """A signed URL and what a request with it must send."""

    url: str
    method: str
    expires: dt.datetime
    headers: dict[str, str]


class _StringToSign(google.auth.credentials.Signing):
    """A stand-in credential that records the string to sign and signs nothing."""

    def __init__(self, email: str) -> None:
        self.email = email
        self.message: bytes | None = None

    def sign_bytes(self, message: bytes) -> bytes:
        self.message = message
        return b""

    @property
    def signer_email(self) -> str:
        return self.email

    @property
    def signer(self) -> Any:
        return None


def resource_path(bucket: str, name: str) -> str:
    """The path-style resource of an object, quoted as ``Blob.generate_signed_url`` does."""
    return f"/{bucket}/{quote(name.encode('utf-8'), safe=b'/~')}"


async def sign_url(
    signer: Signer,
    *,
    endpoint: str,
    bucket: str,
    name: str,
    method: str,
    expires_in: int,
    headers: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> SignedUrl:
    """A V4 signed URL for ``method`` on the object, valid for ``expires_in`` seconds.

    Args:
        signer: signs the string to sign.
        endpoint: scheme and host of the URL (``https://storage.googleapis.com``, or an emulator).
        headers: headers the request must send, and that the signature covers (``Host`` is
            always signed).
        now: the request's time (default: now); needs :data:`TIMESTAMP_SEAM`.

    Raises:
        ValueError: ``expires_in`` is over 7 days, or ``now`` is given without the seam.
        PermissionDenied, BackendError, Unavailable: as the signer raises them.
    """
    recorder = _StringToSign(signer.email)
    options: dict[str, Any] = {}
    if TIMESTAMP_SEAM:
        moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        options["_request_timestamp"] = moment.strftime(TIMESTAMP_FORMAT)
    elif now is not None:
        raise ValueError("google-cloud-storage's signer cannot be given the time")
    unsigned: str = _signing.generate_signed_url_v4(
        recorder,
        resource=resource_path(bucket, name),
        expiration=expires_in,
        api_access_endpoint=endpoint.rstrip("/"),
        method=method,
        headers=dict(headers or {}),
        **options,
    )
    if recorder.message is None or not unsigned.endswith(SIGNATURE_PARAM):
        raise RuntimeError("google-cloud-storage's V4 signer changed: no string to sign")
    signature = await signer.sign(recorder.message)
    query = parse_qs(urlsplit(unsigned).query)
    date = dt.datetime.strptime(query["X-Goog-Date"][0], TIMESTAMP_FORMAT).replace(tzinfo=dt.UTC)
    return SignedUrl(
        url=unsigned + binascii.hexlify(signature).decode(),
        method=method,
        expires=date + dt.timedelta(seconds=expires_in),
        headers=dict(headers or {}),
    )


# -- the loop's signer ------------------------------------------------------------------------


def service_account_key(path: str | None) -> service_account.Credentials | None:
    """The key file at ``path`` if it is a service-account key, else ``None``."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, ValueError):
        return None  # google.auth.default() will say what is wrong with it
    if not isinstance(info, dict) or info.get("type") != "service_account":
        return None
    credentials: service_account.Credentials = (
        service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]  # unannotated in google-auth
    )
    return credentials


class SigningUnavailable(Unavailable):
    """No credentials can sign URLs here."""


def runtime_account(credentials: Any) -> str | None:
    """The service account Application Default Credentials act as, when they say."""
    email = getattr(credentials, "service_account_email", None)
    if isinstance(email, str) and "@" in email:
        return email
    return None


async def create_signer() -> Signer:
    settings = current_settings()
    wanted = settings.signing_service_account
    key = await asyncio.to_thread(
        service_account_key, os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    )
    if key is not None and wanted in (None, key.service_account_email):
        return KeySigner(key)
    session = await HTTP.get()
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.storage_connect_timeout,
        sock_connect=settings.storage_connect_timeout,
        sock_read=settings.storage_timeout,
    )
    if os.environ.get("STORAGE_EMULATOR_HOST", "").strip():
        if wanted is None:
            raise SigningUnavailable(
                "signed URLs need a service-account key (GOOGLE_APPLICATION_CREDENTIALS) or "
                "LOOPGATE_SIGNING_SERVICE_ACCOUNT"
            )
        return IamSigner(session, settings.iam_endpoint, wanted, timeout=timeout)
    adc = await CREDENTIALS.get()
    email = wanted or runtime_account(adc.credentials)
    if email is None:
        raise SigningUnavailable(
            "signed URLs need a service-account key (GOOGLE_APPLICATION_CREDENTIALS), "
            "credentials of a service account, or LOOPGATE_SIGNING_SERVICE_ACCOUNT"
        )

    async def token() -> str | None:
        value = adc.credentials.token  # kept fresh off the loop by RefreshingCredentials
        return str(value) if value else None

    return IamSigner(session, settings.iam_endpoint, email, token, timeout)


SIGNER: ClientSpec[Signer] = ClientSpec("signer", create=create_signer, eager=False)

__all__ = [
    "SIGNER",
    "TIMESTAMP_SEAM",
    "IamSigner",
    "KeySigner",
    "SignedUrl",
    "Signer",
    "create_signer",
    "sign_url",
]
