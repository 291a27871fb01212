"""The worker's fan-out subscriptions: their names, and which ones the sweep deletes."""

from __future__ import annotations

import os
from typing import Any, cast

import pytest
from conftest import PROJECT, PubSubAdmin, Topic, make_settings
from google.pubsub_v1.types import Subscription
from quart import Quart

from service.streams.hub import FANOUT
from service.streams.subscriptions import FanoutSubscriptions

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: no such process


def _subscriptions() -> FanoutSubscriptions:
    admin = cast(Any, None)  # naming and classifying call no Pub/Sub
    return FanoutSubscriptions(make_settings(fanout_prefix="lg"), admin)


def _subscription(name: str, topic: str = "projects/p/topics/t") -> Subscription:
    return Subscription(name=f"projects/{PROJECT}/subscriptions/{name}", topic=topic)


def test_the_name_tells_host_process_and_topic_and_is_new_for_every_feed() -> None:
    subs = _subscriptions()
    first, second, catchup = subs.path("orders"), subs.path("orders"), subs.catchup_path("orders")
    stem = f"projects/{PROJECT}/subscriptions/lg-fanout.{subs.host}.{os.getpid()}.{subs.token}"
    assert (first, second) == (f"{stem}-1.orders", f"{stem}-2.orders")
    assert catchup == f"{stem}-3.orders".replace("-fanout.", "-catchup.")
    for path in (first, second, catchup):
        assert not subs.is_leftover(_subscription(path.rsplit("/", 1)[1]))  # this hub's own


@pytest.mark.parametrize(
    ("name", "topic", "leftover"),
    [
        ("{prefix}{host}.{dead}.abcdef.t", "projects/p/topics/t", True),  # its process is gone
        ("{catchup}{host}.{dead}.abcdef-2.t", "projects/p/topics/t", True),  # a catch-up's too
        ("{catchup}{host}.{parent}.abcdef-2.t", "projects/p/topics/t", False),
        ("{prefix}{host}.{pid}.abcdef.t", "projects/p/topics/t", True),  # an earlier hub here
        ("{prefix}elsewhere.{dead}.abcdef.t", "_deleted-topic_", True),  # its topic was deleted
        ("{prefix}{host}.{parent}.abcdef.t", "projects/p/topics/t", False),  # still running
        ("{prefix}elsewhere.{dead}.abcdef.t", "projects/p/topics/t", False),  # another host's
        ("other-fanout.{host}.{dead}.abcdef.t", "_deleted-topic_", False),  # another prefix
        ("{prefix}{host}.not-a-pid.abcdef.t", "projects/p/topics/t", False),
        ("{prefix}{host}.{dead}", "projects/p/topics/t", False),
    ],
)
def test_leftovers_are_the_unused_subscriptions_of_this_prefix(
    name: str, topic: str, leftover: bool
) -> None:
    subs = _subscriptions()
    name = name.format(
        prefix=subs.prefix,
        catchup=subs.catchup_prefix,
        host=subs.host,
        dead=DEAD_PID,
        pid=os.getpid(),
        parent=os.getppid(),
    )
    assert subs.is_leftover(_subscription(name, topic)) is leftover


async def test_sweep_deletes_own_leftovers_only(
    app: Quart, admin: PubSubAdmin, topic: Topic
) -> None:
    registry = app.extensions["loopclients"].registry_for_running_loop()
    with registry.bind():
        subs = (await FANOUT.get()).subscriptions
    mine = f"{subs.prefix}{subs.host}.{DEAD_PID}.abcdef.{topic.name}"
    alive = f"{subs.prefix}{subs.host}.{os.getppid()}.abcdef.{topic.name}"
    other_host = f"{subs.prefix}elsewhere.{DEAD_PID}.abcdef.{topic.name}"
    unrelated = f"someone-else.{subs.host}.{DEAD_PID}.abcdef.{topic.name}"
    paths = [
        admin.subscriber.subscription_path(PROJECT, n) for n in (mine, alive, other_host, unrelated)
    ]
    for path in paths:
        admin.subscriber.create_subscription(
            request={"name": path, "topic": admin.publisher.topic_path(PROJECT, topic.name)}
        )
    deleted = await subs.sweep()
    assert deleted == [paths[0]]
    remaining = {
        s.name
        for s in admin.subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})
    }
    assert paths[0] not in remaining
    assert set(paths[1:]) <= remaining
    for path in paths[1:]:
        admin.subscriber.delete_subscription(request={"subscription": path})
