"""Direct transfers: V4 signed URLs (with a key, and through a stand-in for IAM's signBlob) and
resumable upload sessions, against the storage emulator, through Quart's test client and a real
server. The emulator serves the XML API's path-style object URLs and ignores signatures: that the
signatures are right is checked against google-cloud-storage's own signer and the key."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from authkit import bearer, new_token, write_tokens
from conftest import WAIT, Server, make_settings
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.cloud import storage as gcs
from google.cloud.storage import _signing
from google.oauth2 import service_account
from quart import Quart
from quart.typing import TestClientProtocol as Client

from service import create_app
from service.clients.storage import signing
from service.clients.storage.signing import KeySigner, sign_url
from service.config import Settings, SettingsError

ACCOUNT = "signer@loopgate-test.iam.gserviceaccount.com"
PROD = "https://storage.googleapis.com"
FROZEN = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
NAMES = ["plain.txt", "dir/sub/file.bin", "with space/and+more%.txt", "ünï/ключ/名前~.txt"]
BAD_NAMES = ["%2E", "%2E%2E", "a%0Ab", "x" * 1025, "a/%2E%2E/b"]
READER, WRITER = new_token(), new_token()
TIMEOUT = aiohttp.ClientTimeout(total=WAIT)


@dataclass
class Key:
    private: rsa.RSAPrivateKey
    info: dict[str, str]
    path: Path

    @property
    def credentials(self) -> service_account.Credentials:
        return service_account.Credentials.from_service_account_info(self.info)

    def verify(self, signature: bytes, message: bytes) -> None:
        self.private.public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def make_key(directory: Path, email: str = ACCOUNT) -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "loopgate-test",
        "private_key_id": "test-key-1",
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path = directory / "key.json"
    path.write_text(json.dumps(info))
    return Key(private, info, path)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Key:
    return make_key(tmp_path_factory.mktemp("key"))


@pytest.fixture
def key_env(key: Key, monkeypatch: pytest.MonkeyPatch) -> Key:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key.path))
    return key


@pytest.fixture
def settings(storage_emulator: Any, bucket: str, key_env: Key) -> Settings:
    return make_settings(buckets=bucket, signed_url_max_seconds=1800)


def object_path(bucket: str, name: str, verb: str) -> str:
    return f"/v1/buckets/{bucket}/objects/{name}:{verb}"


def query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def string_to_sign(url: str, method: str, headers: dict[str, str]) -> bytes:
    """The V4 string to sign for ``url``, rebuilt from the URL as Cloud Storage does."""
    parts = urlsplit(url)
    params = query(url)
    signed = params["X-Goog-SignedHeaders"].split(";")
    values = {name.lower(): value for name, value in headers.items()} | {"host": parts.netloc}
    canonical_query = "&".join(
        f"{quote(name, safe='')}={quote(value, safe='~')}"
        for name, value in sorted(params.items())
        if name != "X-Goog-Signature"
    )
    canonical = "\n".join(
        [
            method,
            parts.path,
            canonical_query,
            "".join(f"{name}:{values[name]}\n" for name in signed),
            ";".join(signed),
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = params["X-Goog-Credential"].split("/", 1)[1]
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical.encode())
    return "\n".join(
        ["GOOG4-RSA-SHA256", params["X-Goog-Date"], scope, digest.finalize().hex()]
    ).encode()


def signature(url: str) -> bytes:
    return binascii.unhexlify(query(url)["X-Goog-Signature"])


# -- the signer, against google-cloud-storage's ------------------------------------------------


def reference_url(
    key: Key, bucket: str, name: str, method: str, seconds: int, headers: dict[str, str]
) -> str:
    """What google-cloud-storage's public signer makes with the key at ``now``."""
    client = gcs.Client.create_anonymous_client()
    url: str = (
        client.bucket(bucket)
        .blob(name)
        .generate_signed_url(
            version="v4",
            expiration=dt.timedelta(seconds=seconds),
            method=method,
            headers=dict(headers),
            credentials=key.credentials,
            api_access_endpoint=PROD,
        )
    )
    return url


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {}),
        ("PUT", {}),
        ("PUT", {"Content-Type": "text/plain; charset=UTF-8"}),
        ("PUT", {"Content-Type": "image/PNG", "x-goog-content-length-range": "0,1048576"}),
    ],
)
async def test_signed_url_is_google_cloud_storages(
    key: Key, monkeypatch: pytest.MonkeyPatch, name: str, method: str, headers: dict[str, str]
) -> None:
    ours = await sign_url(
        KeySigner(key.credentials),
        endpoint=PROD,
        bucket="my-bucket",
        name=name,
        method=method,
        expires_in=900,
        headers=headers,
        now=FROZEN,
    )
    monkeypatch.setattr(_signing, "_NOW", lambda tz=None: FROZEN)
    assert ours.url == reference_url(key, "my-bucket", name, method, 900, headers)
    assert ours.expires == FROZEN + dt.timedelta(seconds=900)
    assert ours.headers == headers
    assert query(ours.url)["X-Goog-Date"] == "20260304T050607Z"
    key.verify(signature(ours.url), string_to_sign(ours.url, method, headers))


async def test_signed_url_time_defaults_to_now(key: Key) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    signed = await sign_url(
        KeySigner(key.credentials),
        endpoint=PROD,
        bucket="my-bucket",
        name="a",
        method="GET",
        expires_in=60,
        now=None,
    )
    after = dt.datetime.now(dt.UTC)
    assert before + dt.timedelta(seconds=60) <= signed.expires <= after + dt.timedelta(seconds=60)
    key.verify(signature(signed.url), string_to_sign(signed.url, "GET", {}))


def test_the_private_timestamp_seam_is_there() -> None:
    """loopgate passes the request's time to google-cloud-storage's signer by a private
    parameter: this fails when a new google-cloud-storage drops it."""
    assert signing.TIMESTAMP_SEAM
    parameters = inspect.signature(_signing.generate_signed_url_v4).parameters
    assert {"_request_timestamp", "api_access_endpoint", "headers", "method"} <= set(parameters)


def test_signed_url_lifetime_setting_is_bounded_by_cloud_storages() -> None:
    assert make_settings().signed_url_max_seconds == 3600
    assert make_settings(signed_url_max_seconds=604_800).signed_url_max_seconds == 604_800
    for bad in ("604801", "0"):
        with pytest.raises(SettingsError, match="LOOPGATE_SIGNED_URL_MAX_SECONDS"):
            make_settings(signed_url_max_seconds=bad)
    with pytest.raises(SettingsError, match="LOOPGATE_IAM_ENDPOINT"):
        make_settings(iam_endpoint="iam.example.com")
    with pytest.raises(SettingsError, match="LOOPGATE_SIGNING_SERVICE_ACCOUNT"):
        make_settings(signing_service_account="not-an-email")


# -- the routes, with a key, against the emulator ---------------------------------------------


async def sign(client: Client, bucket: str, name: str, **body: Any) -> dict[str, Any]:
    response = await client.post(object_path(bucket, name, "signUrl"), json=body)
    answer: dict[str, Any] = await response.get_json()
    assert response.status_code == 200, answer
    return answer


async def test_signed_put_and_get_against_the_emulator(
    client: Client, bucket: str, key_env: Key
) -> None:
    data = bytes(range(256)) * 1000
    name = "big/ünï file.bin"
    put = await sign(client, bucket, name, method="PUT", expiresIn=600, contentType="x/thing")
    assert put["method"] == "PUT"
    assert put["headers"] == {"Content-Type": "x/thing"}
    expires = dt.datetime.strptime(put["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    date = dt.datetime.strptime(query(put["url"])["X-Goog-Date"], "%Y%m%dT%H%M%SZ")
    assert expires == date.replace(tzinfo=dt.UTC) + dt.timedelta(seconds=600)
    assert query(put["url"])["X-Goog-Credential"].startswith(ACCOUNT + "/")
    key_env.verify(signature(put["url"]), string_to_sign(put["url"], "PUT", put["headers"]))

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.put(put["url"], data=data, headers=put["headers"]) as response:
            assert response.status == 200, await response.text()
        get = await sign(client, bucket, name, method="GET")
        assert get["headers"] == {}
        assert query(get["url"])["X-Goog-Expires"] == "900"  # the default lifetime
        async with session.get(get["url"]) as response:
            assert response.status == 200
            assert await response.read() == data

    response = await client.get(f"/v1/buckets/{bucket}/objects/{name}")
    assert response.status_code == 200
    assert await response.get_data() == data
    assert response.headers["Content-Type"] == "x/thing"


async def test_signed_url_points_at_the_emulator(client: Client, bucket: str) -> None:
    import os

    answer = await sign(client, bucket, "a.txt", method="GET")
    assert answer["url"].startswith(f"{os.environ['STORAGE_EMULATOR_HOST']}/{bucket}/a.txt?")


async def test_resumable_session_upload_reads_back_through_loopgate(
    client: Client, bucket: str
) -> None:
    data = b"0123456789" * 100_000
    name = "sessions/ünï.bin"
    response = await client.post(
        object_path(bucket, name, "startUpload"),
        json={"contentType": "application/x-big", "size": len(data)},
    )
    answer = await response.get_json()
    assert response.status_code == 200, answer
    assert set(answer) == {"sessionUrl"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.put(answer["sessionUrl"], data=data) as upload:
            assert upload.status in (200, 201), await upload.text()
    response = await client.get(f"/v1/buckets/{bucket}/objects/{name}")
    assert response.status_code == 200
    assert await response.get_data() == data
    assert response.headers["Content-Type"] == "application/x-big"


@dataclass
class Recorder:
    """A stand-in HTTP backend that records each request and answers as told."""

    answer: Callable[[web.Request, bytes], web.Response]
    requests: list[tuple[web.Request, bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
async def recorder() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    runners: list[web.AppRunner] = []

    async def start(answer: Callable[[web.Request, bytes], web.Response]) -> Recorder:
        recorder = Recorder(answer)

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            recorder.requests.append((request, body))
            return recorder.answer(request, body)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        recorder.url = f"http://127.0.0.1:{port}"
        return recorder

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_upload_session_passes_origin_type_and_size(
    pubsub_emulator: Any,
    recorder: Callable[..., Awaitable[Recorder]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = await recorder(
        lambda request, body: web.Response(headers={"Location": "http://session.example/u?id=1"})
    )
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", backend.url)
    app = create_app(make_settings(buckets="assets"))
    async with app.test_app():
        response = await app.test_client().post(
            object_path("assets", "a/b.bin", "startUpload"),
            json={"contentType": "image/png", "size": 12345},
            headers={"Origin": "https://app.example.com"},
        )
        assert response.status_code == 200, await response.get_json()
        assert await response.get_json() == {"sessionUrl": "http://session.example/u?id=1"}
        response = await app.test_client().post(object_path("assets", "c", "startUpload"), json={})
        assert response.status_code == 200
    (first, body), (second, second_body) = backend.requests
    assert first.method == "POST"
    assert first.path == "/upload/storage/v1/b/assets/o"
    assert first.query["uploadType"] == "resumable"
    assert first.headers["Origin"] == "https://app.example.com"
    assert first.headers["X-Upload-Content-Type"] == "image/png"
    assert first.headers["X-Upload-Content-Length"] == "12345"
    assert json.loads(body) == {"name": "a/b.bin", "contentType": "image/png"}
    assert "Origin" not in second.headers and "X-Upload-Content-Length" not in second.headers
    assert json.loads(second_body) == {"name": "c"}


# -- IAM's signBlob, stood in for --------------------------------------------------------------


async def test_signing_through_iam_sign_blob(
    pubsub_emulator: Any,
    storage_emulator: Any,
    bucket: str,
    key: Key,
    recorder: Callable[..., Awaitable[Recorder]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def sign_blob(request: web.Request, body: bytes) -> web.Response:
        payload = base64.b64decode(json.loads(body)["payload"])
        signed = key.private.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return web.json_response(
            {"keyId": "test-key-1", "signedBlob": base64.b64encode(signed).decode()}
        )

    iam = await recorder(sign_blob)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    settings = make_settings(buckets=bucket, signing_service_account=ACCOUNT, iam_endpoint=iam.url)
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        answer = await sign(client, bucket, "dir/ünï.txt", method="PUT", contentType="text/plain")
        assert len(iam.requests) == 1
        request, body = iam.requests[0]
        assert request.method == "POST"
        assert request.path == f"/v1/projects/-/serviceAccounts/{ACCOUNT}:signBlob"
        assert "Authorization" not in request.headers  # the emulator's: no Google credentials
        payload = base64.b64decode(json.loads(body)["payload"])
        assert payload == string_to_sign(answer["url"], "PUT", answer["headers"])
        key.verify(signature(answer["url"]), payload)
        # The very URL the key would have signed locally at the same time.
        date = dt.datetime.strptime(query(answer["url"])["X-Goog-Date"], "%Y%m%dT%H%M%SZ")
        local = await sign_url(
            KeySigner(key.credentials),
            endpoint=urlsplit(answer["url"])._replace(path="", query="").geturl(),
            bucket=bucket,
            name="dir/ünï.txt",
            method="PUT",
            expires_in=900,
            headers={"Content-Type": "text/plain"},
            now=date.replace(tzinfo=dt.UTC),
        )
        assert answer["url"] == local.url

        iam.answer = lambda request, body: web.json_response(
            {"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.signBlob' denied"}},
            status=403,
        )
        response = await client.post(object_path(bucket, "x", "signUrl"), json={"method": "GET"})
        error = (await response.get_json())["error"]
        assert response.status_code == 403, error
        assert error["status"] == "PERMISSION_DENIED"
        assert "signBlob' denied" in error["message"]
        assert "roles/iam.serviceAccountTokenCreator" in error["message"]

        iam.answer = lambda request, body: web.Response(status=500, text="boom")
        response = await client.post(object_path(bucket, "x", "signUrl"), json={"method": "GET"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"

        iam.answer = lambda request, body: web.json_response({"keyId": "k"})
        response = await client.post(object_path(bucket, "x", "signUrl"), json={"method": "GET"})
        assert response.status_code == 503
        assert "no signedBlob" in (await response.get_json())["error"]["message"]


async def test_no_signer_is_503_naming_what_is_missing(
    pubsub_emulator: Any, storage_emulator: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    app = create_app(make_settings(buckets=bucket))
    async with app.test_app():
        response = await app.test_client().post(
            object_path(bucket, "x", "signUrl"), json={"method": "GET"}
        )
        assert response.status_code == 503
        message = (await response.get_json())["error"]["message"]
        assert "GOOGLE_APPLICATION_CREDENTIALS" in message
        assert "LOOPGATE_SIGNING_SERVICE_ACCOUNT" in message


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture
async def auth_app(
    pubsub_emulator: Any, storage_emulator: Any, bucket: str, key_env: Key, tmp_path: Path
) -> AsyncIterator[Quart]:
    tokens = write_tokens(
        tmp_path / "tokens.toml",
        {
            "reader": (READER, [f"storage:read:{bucket}"]),
            "writer": (WRITER, [f"storage:write:{bucket}"]),
        },
    )
    settings = make_settings(
        buckets=bucket, auth="enabled", auth_file=str(tokens), signed_url_max_seconds=1800
    )
    app = create_app(settings)
    async with app.test_app():
        yield app


async def status_of(client: Client, path: str, token: str | None, body: Any) -> tuple[int, str]:
    headers = bearer(token) if token else {}
    response = await client.post(path, json=body, headers=headers)
    answer = await response.get_json()
    return response.status_code, json.dumps(answer)


async def test_scopes_decide_the_method(auth_app: Quart, bucket: str) -> None:
    client = auth_app.test_client()
    sign_path = object_path(bucket, "a.txt", "signUrl")
    start_path = object_path(bucket, "a.txt", "startUpload")
    assert (await status_of(client, sign_path, READER, {"method": "GET"}))[0] == 200
    status, body = await status_of(client, sign_path, READER, {"method": "PUT"})
    assert status == 403 and f"storage:write:{bucket}" in body
    assert (await status_of(client, sign_path, WRITER, {"method": "PUT"}))[0] == 200
    status, body = await status_of(client, sign_path, WRITER, {"method": "GET"})
    assert status == 403 and f"storage:read:{bucket}" in body
    assert (await status_of(client, start_path, READER, {}))[0] == 403
    assert (await status_of(client, start_path, WRITER, {}))[0] == 200
    assert (await status_of(client, sign_path, None, {"method": "GET"}))[0] == 401
    assert (await status_of(client, start_path, None, {}))[0] == 401


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"method": "GET", "expiresIn": 1801}, "at most 1800 seconds"),
        ({"method": "GET", "expiresIn": 0}, "expiresIn"),
        ({"method": "DELETE"}, "method"),
        ({}, "method"),
        ({"method": "GET", "contentType": "text/plain"}, "PUT only"),
        ({"method": "PUT", "contentType": "text/plain\r\nX-Evil: 1"}, "contentType"),
        ({"method": "GET", "extra": 1}, "extra"),
    ],
)
async def test_bad_sign_requests_are_400(
    auth_app: Quart, bucket: str, body: dict[str, Any], problem: str
) -> None:
    status, answer = await status_of(
        auth_app.test_client(), object_path(bucket, "a", "signUrl"), READER, body
    )
    assert status == 400, answer
    assert problem in answer


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize(
    ("verb", "token", "body"),
    [("signUrl", READER, {"method": "GET"}), ("startUpload", WRITER, {})],
    ids=["signUrl", "startUpload"],  # not the tokens: they are new in every process
)
async def test_bad_names_are_400(
    auth_app: Quart, bucket: str, name: str, verb: str, token: str, body: dict[str, Any]
) -> None:
    status, answer = await status_of(
        auth_app.test_client(), object_path(bucket, name, verb), token, body
    )
    assert status == 400, answer
    assert "invalid object name" in answer


async def test_buckets_not_served_are_404(client: Client) -> None:
    for verb, body in (("signUrl", {"method": "GET"}), ("startUpload", {})):
        status, answer = await status_of(client, object_path("elsewhere", "a", verb), None, body)
        assert status == 404, answer


async def test_upload_sessions_keep_the_object_limit(
    pubsub_emulator: Any, storage_emulator: Any, bucket: str, key_env: Key
) -> None:
    app = create_app(make_settings(buckets=bucket, max_object_bytes=1000))
    async with app.test_app():
        client = app.test_client()
        start = object_path(bucket, "a", "startUpload")
        assert (await status_of(client, start, None, {"size": 1001}))[0] == 413
        status, answer = await status_of(client, start, None, {})
        assert status == 400 and "size" in answer
        assert (await status_of(client, start, None, {"size": 1000}))[0] == 200
        answer = await sign(client, bucket, "a", method="PUT")
        assert answer["headers"] == {"x-goog-content-length-range": "0,1000"}
        answer = await sign(client, bucket, "a", method="GET")
        assert answer["headers"] == {}


# -- through a real server -------------------------------------------------------------------


async def test_server_signs_and_starts_sessions(
    start_server: Callable[..., Awaitable[Server]],
    storage_emulator: Any,
    bucket: str,
    key: Key,
    tmp_path: Path,
) -> None:
    tokens = write_tokens(
        tmp_path / "tokens.toml",
        {
            "reader": (READER, [f"storage:read:{bucket}"]),
            "writer": (WRITER, [f"storage:write:{bucket}"]),
        },
    )
    server = await start_server(
        env={
            "STORAGE_EMULATOR_HOST": storage_emulator.url,
            "GOOGLE_APPLICATION_CREDENTIALS": str(key.path),
            "LOOPGATE_BUCKETS": bucket,
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_AUTH_FILE": str(tokens),
            "LOOPGATE_SIGNED_URL_MAX_SECONDS": "600",
        }
    )
    base = f"{server.url}{object_path(bucket, 'srv/ünï.txt', '')}"[:-1]
    data = b"through a real server\n" * 1000
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def call(verb: str, token: str, body: Any) -> tuple[int, dict[str, Any]]:
            async with session.post(base + verb, json=body, headers=bearer(token)) as response:
                return response.status, await response.json()

        status, answer = await call(":startUpload", WRITER, {"contentType": "text/plain"})
        assert status == 200, answer
        async with session.put(answer["sessionUrl"], data=data) as upload:
            assert upload.status in (200, 201), await upload.text()

        status, answer = await call(":signUrl", READER, {"method": "GET", "expiresIn": 600})
        assert status == 200, answer
        key.verify(signature(answer["url"]), string_to_sign(answer["url"], "GET", {}))
        async with session.get(answer["url"]) as response:
            assert response.status == 200
            assert await response.read() == data

        status, answer = await call(":signUrl", READER, {"method": "PUT"})
        assert status == 403, answer
        status, answer = await call(":signUrl", READER, {"method": "GET", "expiresIn": 601})
        assert status == 400 and "at most 600 seconds" in answer["error"]["message"]
        bad = f"{server.url}/v1/buckets/{bucket}/objects/a%0Ab:signUrl"
        async with session.post(bad, json={"method": "GET"}, headers=bearer(READER)) as response:
            assert response.status == 400
        async with session.get(
            f"{server.url}/v1/buckets/{bucket}/objects/srv/ünï.txt", headers=bearer(READER)
        ) as response:
            assert response.status == 200
            assert await response.read() == data
