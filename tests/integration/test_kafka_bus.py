"""KafkaBus against librdkafka's mock cluster: outages, reconnection, topic creation.

Outages are real at the socket level: ``broker_down`` makes the mock broker close its
connections and refuse new ones (its data is kept), ``broker_up`` lets it accept
again on the same address. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

import pytest

from qmtl.bus import (
    CONTROL_TOPICS,
    TOPIC_ACTIVATION,
    TOPIC_QUEUES,
    BusClosed,
    BusUnavailable,
    queue_key,
)
from qmtl.bus.kafka import KafkaBus
from tests.helpers.bus import WAIT, take, wait_until
from tests.helpers.events import numbered_activation, numbered_queue_update

pytestmark = pytest.mark.kafka

FETCH = 1  # Kafka ApiKey of Fetch
TOPIC_AUTHORIZATION_FAILED = 29


def new_bus(bootstrap: str, validator, prefix: str, **kw) -> KafkaBus:
    options = {
        "validator": validator,
        "topic_prefix": prefix,
        "request_timeout_ms": 1000,
        "publish_timeout_ms": 2000,
        "reconnect_backoff": (0.05, 0.3),
    }
    options.update(kw)
    return KafkaBus(bootstrap, **options)


def prefix() -> str:
    return f"i{uuid.uuid4().hex[:10]}."


def topic_partitions(bootstrap: str) -> dict[str, int]:
    """Topics on the cluster and their partition counts (without auto-creating any)."""
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in md.topics.items()}


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    yield
    for _ in range(10):
        await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not leftover, f"tasks left running: {leftover}"


# -- topic creation ---------------------------------------------------------------------
async def test_topic_creation_falls_back_to_auto_creation(kafka_bootstrap, event_validator, caplog):
    p = prefix()
    bus = new_bus(kafka_bootstrap, event_validator, p, create_topics=True, num_partitions=4)
    caplog.set_level(logging.WARNING, logger="qmtl.bus")
    await bus.start()
    try:
        # The mock has no CreateTopics: the bus said so and carried on.
        assert any("auto-creation" in r.getMessage() for r in caplog.records), caplog.text
        topics = topic_partitions(kafka_bootstrap)
        for t in CONTROL_TOPICS:
            assert topics.get(p + t) == 4, topics  # created by the broker, 4 partitions
        sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="gw-" + p)
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
        [msg] = await take(sub, 1)
        assert msg.value["etag"] == "w:1"
    finally:
        await bus.close()


async def test_without_create_topics_first_use_creates_the_topic(kafka_bootstrap, event_validator):
    p = prefix()
    bus = new_bus(kafka_bootstrap, event_validator, p, create_topics=False)
    await bus.start()
    try:
        assert not any(name.startswith(p) for name in topic_partitions(kafka_bootstrap))
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
        assert p + TOPIC_ACTIVATION in topic_partitions(kafka_bootstrap)
        sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="gw-" + p)
        [msg] = await take(sub, 1)
        assert msg.value["etag"] == "w:1"
    finally:
        await bus.close()


async def test_every_partition_is_consumed_without_group_rebalancing(fresh_kafka_cluster, event_validator):
    """A topic with more partitions than the default: each identity assigns them all."""
    cluster = fresh_kafka_cluster
    p = prefix()
    cluster.create_topic(p + TOPIC_QUEUES, 7)
    buses = [new_bus(cluster.bootstrap_servers, event_validator, p) for _ in range(2)]
    try:
        for b in buses:
            await b.start()
        subs = [await b.subscribe([TOPIC_QUEUES], consumer_id=f"gw{i}-{p}") for i, b in enumerate(buses)]
        sent = set()
        for i in range(70):
            tags = [f"tag{i}", "spot"]
            await buses[0].publish(TOPIC_QUEUES, numbered_queue_update(tags, 60, i), key=queue_key(tags, 60))
            sent.add(queue_key(tags, 60))
        for sub in subs:
            got = await take(sub, 70)
            assert {m.key for m in got} == sent
            assert {m.partition for m in got} == set(range(7))
    finally:
        for b in buses:
            await b.close()


# -- outages ----------------------------------------------------------------------------
async def test_broker_down_publish_fails_bounded_then_everything_recovers(fresh_kafka_cluster, event_validator):
    cluster = fresh_kafka_cluster
    p = prefix()
    cid = "gw-" + p
    bus = new_bus(cluster.bootstrap_servers, event_validator, p)
    await bus.start()
    received = []
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=cid)

    async def relay():
        async for msg in sub:
            received.append(msg)
            await sub.commit(msg)

    relay_task = asyncio.ensure_future(relay())
    try:
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
        await wait_until(lambda: len(received) == 1, what="the first event")

        cluster.broker_down()
        t0 = time.monotonic()
        with pytest.raises(BusUnavailable, match="unavailable") as err:
            await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 2), key="w")
        elapsed = time.monotonic() - t0
        assert elapsed < 10, f"publish took {elapsed:.1f}s, bound is 2s"  # bounded, not hanging (generous: not a timing test)
        assert cluster.bootstrap_servers in str(err.value)
        assert not relay_task.done()  # the subscription survives the outage

        cluster.broker_up()
        # The caller retries what was not confirmed (it may also arrive twice: at-least-once).
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 2), key="w")
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 3), key="w")
        await wait_until(lambda: "w:3" in [m.value["etag"] for m in received], what="events after recovery")
        etags = [m.value["etag"] for m in received]
        firsts = list(dict.fromkeys(etags))
        assert firsts == ["w:1", "w:2", "w:3"]  # per-key order across the outage
        await wait_until(lambda: not sub.pending_commits, what="commits to reach the broker")
    finally:
        await sub.close()
        await asyncio.wait_for(relay_task, WAIT)
        await bus.close()

    # A restarted replica with the same identity resumes after the last commit.
    bus2 = new_bus(cluster.bootstrap_servers, event_validator, p)
    await bus2.start()
    try:
        sub2 = await bus2.subscribe([TOPIC_ACTIVATION], consumer_id=cid)
        await bus2.publish(TOPIC_ACTIVATION, numbered_activation("w", 4), key="w")
        [msg] = await take(sub2, 1)
        assert msg.value["etag"] == "w:4"
    finally:
        await bus2.close()


async def test_bus_started_while_broker_down_connects_when_it_returns(fresh_kafka_cluster, event_validator, caplog):
    cluster = fresh_kafka_cluster
    p = prefix()
    cluster.broker_down()
    bus = new_bus(cluster.bootstrap_servers, event_validator, p)
    caplog.set_level(logging.WARNING, logger="qmtl.bus")
    t0 = time.monotonic()
    await bus.start()  # not fatal
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="gw-" + p)  # not fatal either
    assert time.monotonic() - t0 < 10
    assert "not reachable at start" in caplog.text
    assert not sub.ready
    try:
        cluster.broker_up()
        await wait_until(lambda: sub.ready, what="the subscription to connect")
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
        [msg] = await take(sub, 1)
        assert msg.value["etag"] == "w:1"
    finally:
        await bus.close()


async def test_unreachable_broker_publish_raises_bus_unavailable(event_validator):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bus = new_bus(f"127.0.0.1:{port}", event_validator, prefix(), request_timeout_ms=500, publish_timeout_ms=1000)
    t0 = time.monotonic()
    await bus.start()
    with pytest.raises(BusUnavailable, match=f"127.0.0.1:{port}"):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="gw")
    assert not sub.ready
    await bus.close()
    assert time.monotonic() - t0 < 10
    with pytest.raises(BusClosed):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 2), key="w")


async def test_consumer_is_rebuilt_after_fetch_errors(fresh_kafka_cluster, event_validator, caplog):
    cluster = fresh_kafka_cluster
    p = prefix()
    bus = new_bus(cluster.bootstrap_servers, event_validator, p)
    await bus.start()
    caplog.set_level(logging.WARNING, logger="qmtl.bus")
    try:
        sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="gw-" + p)
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
        first = await take(sub, 1)
        # The next Fetch requests fail: aiokafka raises it from getmany; the
        # subscription rebuilds its consumer and goes on where it was.
        cluster.push_request_errors(FETCH, *[TOPIC_AUTHORIZATION_FAILED] * 3)
        for seq in range(2, 6):
            await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", seq), key="w")
        rest = await take(sub, 4)
        assert [m.value["etag"] for m in first + rest] == [f"w:{i}" for i in range(1, 6)]
        assert "reconnecting" in caplog.text
    finally:
        await bus.close()


async def test_close_with_broker_down_and_a_publish_in_flight_is_bounded(fresh_kafka_cluster, event_validator):
    cluster = fresh_kafka_cluster
    p = prefix()
    bus = new_bus(cluster.bootstrap_servers, event_validator, p, publish_timeout_ms=30_000)
    await bus.start()
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="gw-" + p)
    await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
    cluster.broker_down()
    pending = asyncio.ensure_future(bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 2), key="w"))
    await asyncio.sleep(0.3)  # the event is queued in the producer, not deliverable
    assert not pending.done()
    t0 = time.monotonic()
    await bus.close()
    assert time.monotonic() - t0 < 5
    with pytest.raises(BusUnavailable):  # BusClosed is a BusUnavailable
        await asyncio.wait_for(pending, WAIT)
    assert sub.closed


async def test_offsets_with_the_broker_away_raise_bus_unavailable_then_recover(fresh_kafka_cluster, event_validator):
    cluster = fresh_kafka_cluster
    p = prefix()
    bus = new_bus(cluster.bootstrap_servers, event_validator, p)
    await bus.start()
    try:
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 1), key="w")
        ends = await bus.end_offsets([TOPIC_ACTIVATION])
        assert sum(ends.values()) == 1
        cluster.broker_down()
        t0 = time.monotonic()
        with pytest.raises(BusUnavailable, match=cluster.bootstrap_servers):
            await bus.end_offsets([TOPIC_ACTIVATION])
        with pytest.raises(BusUnavailable, match=cluster.bootstrap_servers):
            await bus.committed_offsets("gw-" + p, [TOPIC_ACTIVATION])
        assert time.monotonic() - t0 < 10
        cluster.broker_up()
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", 2), key="w")
        assert sum((await bus.end_offsets([TOPIC_ACTIVATION])).values()) == 2  # a new offsets client
    finally:
        await bus.close()
    with pytest.raises(BusClosed):
        await bus.end_offsets([TOPIC_ACTIVATION])
