"""Publish routes: Pub/Sub's REST body in, message ids out; every bad input refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import pytest
from conftest import PROJECT, Topic, make_settings

from service import create_app


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(body: Any, code: int, text: str) -> None:
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["status"], str) and body["error"]["status"]
    assert text in body["error"]["message"], body["error"]["message"]


async def test_publish_and_read_back(client: Any, topic: Topic) -> None:
    messages = [
        {"data": b64(b"plain")},
        {"data": b64(bytes(range(256))), "attributes": {"kind": "binary", "n": "2"}},
        {"attributes": {"only": "attributes"}},
        {"data": b64(b"ordered"), "orderingKey": "key-1"},
    ]
    response = await client.post(f"/v1/topics/{topic.name}:publish", json={"messages": messages})
    body = await response.get_json()
    assert response.status_code == 200, body
    ids = body["messageIds"]
    assert len(ids) == 4 and len(set(ids)) == 4
    received = {m.message_id: m for m in topic.received(4)}
    assert set(received) == set(ids)
    assert received[ids[0]].data == b"plain"
    assert received[ids[1]].data == bytes(range(256))
    assert dict(received[ids[1]].attributes) == {"kind": "binary", "n": "2"}
    assert received[ids[2]].data == b"" and dict(received[ids[2]].attributes) == {
        "only": "attributes"
    }
    assert received[ids[3]].ordering_key == "key-1"


async def test_pubsub_project_path(client: Any, topic: Topic) -> None:
    response = await client.post(
        f"/v1/projects/{PROJECT}/topics/{topic.name}:publish",
        json={"messages": [{"data": b64(b"via project path")}]},
    )
    assert response.status_code == 200
    ids = (await response.get_json())["messageIds"]
    assert [m.message_id for m in topic.received(1)] == ids


async def test_other_project_is_not_found(client: Any, topic: Topic) -> None:
    response = await client.post(
        f"/v1/projects/someone-else/topics/{topic.name}:publish",
        json={"messages": [{"data": b64(b"x")}]},
    )
    assert response.status_code == 404
    assert_error(await response.get_json(), 404, "someone-else")
    assert topic.received(0, timeout=1) == []


async def test_missing_topic_is_not_found(client: Any) -> None:
    response = await client.post(
        "/v1/topics/never-created:publish", json={"messages": [{"data": b64(b"x")}]}
    )
    assert response.status_code == 404
    assert_error(await response.get_json(), 404, "never-created")


async def test_topic_outside_the_allowlist_is_not_found(pubsub_emulator: Any, topic: Topic) -> None:
    app = create_app(make_settings(topics="allowed-one,allowed-two"))
    async with app.test_app():
        response = await app.test_client().post(
            f"/v1/topics/{topic.name}:publish", json={"messages": [{"data": b64(b"x")}]}
        )
    assert response.status_code == 404
    assert_error(await response.get_json(), 404, "is not served here")
    assert topic.received(0, timeout=1) == []


LONG = "k" * 257
BAD_BODIES: list[tuple[str, Any, str]] = [
    ("no messages key", {}, "messages"),
    ("empty list", {"messages": []}, "messages"),
    ("not an object", {"messages": ["aGk="]}, "messages.0"),
    ("bad base64", {"messages": [{"data": "not base64!"}]}, "not valid base64"),
    ("bad base64 padding", {"messages": [{"data": "aGk"}]}, "not valid base64"),
    ("neither data nor attributes", {"messages": [{}]}, "non-empty data or at least one attribute"),
    ("empty data, no attributes", {"messages": [{"data": ""}]}, "non-empty data"),
    ("too many messages", {"messages": [{"data": "aGk="}] * 1001}, "messages"),
    (
        "too many attributes",
        {"messages": [{"attributes": {f"k{i}": "v" for i in range(101)}}]},
        "attributes",
    ),
    (
        "attribute key too long",
        {"messages": [{"attributes": {LONG: "v"}}]},
        "longer than 256 bytes",
    ),
    (
        "attribute value too long",
        {"messages": [{"attributes": {"k": "v" * 1025}}]},
        "longer than 1024 bytes",
    ),
    ("reserved attribute key", {"messages": [{"attributes": {"googkey": "v"}}]}, "reserved"),
    ("attribute value not a string", {"messages": [{"attributes": {"k": 1}}]}, "attributes.k"),
    ("unknown field", {"messages": [{"data": "aGk=", "color": "red"}]}, "color"),
    (
        "ordering key too long",
        {"messages": [{"data": "aGk=", "orderingKey": "o" * 1025}]},
        "orderingKey",
    ),
    (
        "one bad message among good ones",
        {"messages": [{"data": "aGk="}, {"data": "%%%"}]},
        "messages.1",
    ),
]


@pytest.mark.parametrize(("case", "body", "text"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_body_is_refused_and_publishes_nothing(
    client: Any, topic: Topic, case: str, body: Any, text: str
) -> None:
    response = await client.post(f"/v1/topics/{topic.name}:publish", json=body)
    assert response.status_code == 400
    assert_error(await response.get_json(), 400, text)
    assert topic.received(0, timeout=1) == []


async def test_malformed_json_is_refused(client: Any, topic: Topic) -> None:
    response = await client.post(
        f"/v1/topics/{topic.name}:publish",
        data=b'{"messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert (await response.get_json())["error"]["code"] == 400
    assert topic.received(0, timeout=1) == []


async def test_body_over_the_limit_is_refused(client: Any, topic: Topic) -> None:
    payload = json.dumps({"messages": [{"data": b64(b"x" * (8 * 1024 * 1024))}]}).encode()
    assert len(payload) > 10 * 1024 * 1024
    response = await client.post(
        f"/v1/topics/{topic.name}:publish",
        data=payload,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert_error(await response.get_json(), 413, "larger than")
    assert topic.received(0, timeout=1) == []


@pytest.mark.parametrize(
    "name", ["ab", "1starts-with-digit", "goog-reserved", "has space", "x" * 256, "bad*char"]
)
async def test_invalid_topic_name_is_refused(client: Any, name: str) -> None:
    response = await client.post(
        f"/v1/topics/{name}:publish", json={"messages": [{"data": b64(b"x")}]}
    )
    assert response.status_code == 400
    assert_error(await response.get_json(), 400, "invalid topic name")


async def test_openapi_documents_the_publish_route(client: Any) -> None:
    response = await client.get("/openapi.json")
    spec = await response.get_json()
    assert "/v1/topics/{topic}:publish" in spec["paths"]
    docs = await client.get("/docs")
    assert docs.status_code == 200


@pytest.mark.server
async def test_gcloud_aio_pubsub_client_publishes_through_loopgate(
    start_server: Any, topic: Topic
) -> None:
    from gcloud.aio.pubsub import PublisherClient, PubsubMessage

    server = await start_server()
    async with aiohttp.ClientSession() as session:
        publisher = PublisherClient(session=session, api_root=f"{server.url}/v1")
        result = await publisher.publish(
            publisher.topic_path(PROJECT, topic.name),
            [PubsubMessage(b"from gcloud-aio", kind="rest"), PubsubMessage(b"second")],
        )
    ids = result["messageIds"]
    received = {m.message_id: m for m in topic.received(2)}
    assert set(received) == set(ids)
    assert received[ids[0]].data == b"from gcloud-aio"
    assert dict(received[ids[0]].attributes) == {"kind": "rest"}
