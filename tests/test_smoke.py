from __future__ import annotations

import base64

from conftest import Topic


async def test_publish_round_trip(client, topic: Topic) -> None:
    response = await client.post(
        f"/v1/topics/{topic.name}:publish",
        json={"messages": [{"data": base64.b64encode(b"hello").decode(), "attributes": {"a": "b"}}]},
    )
    body = await response.get_json()
    assert response.status_code == 200, body
    received = topic.received(1)
    assert [m.message_id for m in received] == body["messageIds"]
    assert received[0].data == b"hello"
