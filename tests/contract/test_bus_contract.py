"""The ControlBus contract (SPEC §5), run against every implementation.

The same tests run on the in-process bus and on the Kafka bus over librdkafka's mock
cluster. Every wait is bounded; topics (Kafka: a per-test topic prefix) and consumer
ids are unique per test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict

import pytest

from qmtl.bus import (
    CONTROL_TOPICS,
    TOPIC_ACTIVATION,
    TOPIC_POLICY,
    TOPIC_QUEUES,
    BusMessage,
    ControlBus,
    InProcessBus,
    InvalidEvent,
    make_bus,
    partition_key,
    queue_key,
)
from tests.helpers.bus import WAIT, take, wait_until
from tests.helpers.events import (
    numbered_activation,
    numbered_queue_update,
    policy_updated,
)


def ident(msg: BusMessage) -> tuple[str, str]:
    return msg.key, msg.value["etag"]


async def assert_quiet(sub, wait: float = 0.3) -> None:
    """Nothing more arrives within ``wait`` seconds."""
    try:
        msg = await asyncio.wait_for(sub.__anext__(), wait)
    except TimeoutError:
        return
    pytest.fail(f"unexpected extra message {msg}")


# -- harness -----------------------------------------------------------------------
class Harness:
    """One bus under test plus what a test needs around it."""

    def __init__(self, kind: str, validator, bootstrap: str | None = None) -> None:
        self.kind = kind
        self.validator = validator
        self.bootstrap = bootstrap
        self.prefix = f"t{uuid.uuid4().hex[:10]}."
        self._buses: list[ControlBus] = []
        self._raw_producer = None
        self.bus: ControlBus

    def new_bus(self) -> ControlBus:
        if self.kind == "inproc":
            return InProcessBus(validator=self.validator)
        from qmtl.bus.kafka import KafkaBus

        return KafkaBus(
            self.bootstrap,
            validator=self.validator,
            topic_prefix=self.prefix,
            request_timeout_ms=5000,
            publish_timeout_ms=5000,
            reconnect_backoff=(0.05, 0.5),
        )

    async def open(self) -> None:
        self.bus = await self._started(self.new_bus())

    async def _started(self, bus: ControlBus) -> ControlBus:
        await bus.start()
        self._buses.append(bus)
        return bus

    async def peer(self) -> ControlBus:
        """The bus another Gateway replica (or a restarted one) would use."""
        if self.kind == "inproc":
            return self.bus  # embedded: one process, one bus
        return await self._started(self.new_bus())

    async def raw_publish(self, topic: str, key: str, payload: bytes) -> None:
        """Put bytes on ``topic`` without the bus's validation (a faulty producer)."""
        if self.kind == "inproc":
            self.bus.append_raw(topic, payload, key=key)  # type: ignore[attr-defined]
            return
        from aiokafka import AIOKafkaProducer

        if self._raw_producer is None:
            self._raw_producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
            await self._raw_producer.start()
        await asyncio.wait_for(
            self._raw_producer.send_and_wait(self.prefix + topic, payload, key=key.encode()), WAIT
        )

    def consumer_id(self, name: str) -> str:
        return f"{name}-{uuid.uuid4().hex[:8]}"

    async def aclose(self) -> None:
        if self._raw_producer is not None:
            await self._raw_producer.stop()
        for bus in reversed(self._buses):
            await bus.close()


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    yield
    for _ in range(10):
        await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not leftover, f"tasks left running: {leftover}"


@pytest.fixture(params=["inproc", pytest.param("kafka", marks=pytest.mark.kafka)])
async def harness(request, event_validator):
    if request.param == "kafka":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        h = Harness("kafka", event_validator, bootstrap)
    else:
        h = Harness("inproc", event_validator)
    await h.open()
    try:
        yield h
    finally:
        await h.aclose()


# -- the contract --------------------------------------------------------------------
async def test_publish_consume_round_trip(harness: Harness):
    bus = harness.bus
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("gw"))
    event = numbered_activation("w1", 1)
    await bus.publish(TOPIC_ACTIVATION, event, key="w1")
    [msg] = await take(sub, 1)
    assert msg.topic == TOPIC_ACTIVATION
    assert msg.key == "w1"
    assert msg.value == event
    assert msg.offset >= 0 and msg.partition >= 0
    assert abs(msg.timestamp_ms - time.time() * 1000) < 60_000
    await sub.close()


async def test_headers_round_trip(harness: Harness):
    bus = harness.bus
    async with await bus.subscribe([TOPIC_POLICY], consumer_id=harness.consumer_id("gw")) as sub:
        headers = {"correlation_id": "c0ffee-42", "traceparent": "00-abc-def-01", "note": "héllo ✓"}
        await bus.publish(TOPIC_POLICY, policy_updated("w1", 3), key="w1", headers=headers)
        await bus.publish(TOPIC_POLICY, policy_updated("w1", 4), key="w1")
        first, second = await take(sub, 2)
        assert dict(first.headers) == headers
        assert dict(second.headers) == {}
    assert sub.closed  # type: ignore[attr-defined]


async def test_lag_counts_what_is_not_delivered_yet(harness: Harness):
    bus = harness.bus
    for seq in range(5):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", seq), key="w")
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("gw"))
    await take(sub, 2)
    await wait_until(lambda: sum(sub.lag().values()) == 3, what="lag == 3")
    await take(sub, 3)
    await wait_until(lambda: sum(sub.lag().values()) == 0, what="lag == 0")
    await sub.close()


async def test_per_key_order_across_many_keys(harness: Harness):
    bus = harness.bus
    sub = await bus.subscribe(list(CONTROL_TOPICS), consumer_id=harness.consumer_id("gw"))
    worlds = [f"world-{i}" for i in range(25)]
    per_key = 20
    expected: dict[str, list[str]] = defaultdict(list)
    for seq in range(per_key):  # interleave keys
        for w in worlds:
            event = numbered_activation(w, seq)
            await bus.publish(TOPIC_ACTIVATION, event, key=partition_key(TOPIC_ACTIVATION, event))
            expected[w].append(event["etag"])
        qu = numbered_queue_update(["btc", "spot"], 60, seq)
        await bus.publish(TOPIC_QUEUES, qu, key=partition_key(TOPIC_QUEUES, qu))
        expected[queue_key(["spot", "btc"], 60)].append(qu["etag"])
    total = sum(len(v) for v in expected.values())
    got = await take(sub, total)
    seen: dict[str, list[str]] = defaultdict(list)
    for msg in got:
        seen[msg.key].append(msg.value["etag"])
    assert seen == expected
    await sub.close()


async def test_every_consumer_id_gets_every_event(harness: Harness):
    """Two Gateway replicas, each its own consumer identity: fan-out, not work-sharing."""
    bus_a, bus_b = harness.bus, await harness.peer()
    sub_a = await bus_a.subscribe(list(CONTROL_TOPICS), consumer_id=harness.consumer_id("gw-a"), from_beginning=False)
    sub_b = await bus_b.subscribe(list(CONTROL_TOPICS), consumer_id=harness.consumer_id("gw-b"), from_beginning=False)
    sent = []
    for i in range(40):
        w = f"w{i % 8}"
        if i % 2:
            event, topic = numbered_activation(w, i), TOPIC_ACTIVATION
        else:
            event, topic = policy_updated(w, i), TOPIC_POLICY
            event["checksum"] = f"{w}:{i}"  # PolicyUpdated has no etag: an id to compare
        await bus_a.publish(topic, event, key=w)
        sent.append((topic, w, i))
    got_a = await take(sub_a, len(sent))
    got_b = await take(sub_b, len(sent))

    def ids(msgs):
        return sorted((m.topic, m.key, m.value.get("etag") or m.value["checksum"]) for m in msgs)

    assert ids(got_a) == ids(got_b)
    assert len(set(ids(got_a))) == len(sent)
    partitions = {(m.topic, m.partition) for m in got_a}
    assert len(partitions) > 1, "keys should spread over several partitions"
    await assert_quiet(sub_a, 0.1)
    await sub_a.close()
    await sub_b.close()


async def test_resume_after_commit_redelivers_only_uncommitted(harness: Harness):
    bus = harness.bus
    cid = harness.consumer_id("gw")
    keys = [f"w{i}" for i in range(6)]
    events = [(k, numbered_activation(k, seq)) for seq in range(8) for k in keys]
    for k, e in events:
        await bus.publish(TOPIC_ACTIVATION, e, key=k)

    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=cid)
    applied = await take(sub, 20)
    for msg in applied:
        await sub.commit(msg)  # applied, then committed
    delivered_not_committed = await take(sub, 10)
    await sub.close()

    # A restarted replica with the same identity (a new bus instance for Kafka).
    bus2 = await harness.peer()
    sub2 = await bus2.subscribe([TOPIC_ACTIVATION], consumer_id=cid, from_beginning=False)
    remaining = len(events) - len(applied)
    got = await take(sub2, remaining)
    all_ids = Counter((k, e["etag"]) for k, e in events)
    expected = all_ids - Counter(ident(m) for m in applied)
    assert Counter(ident(m) for m in got) == expected  # nothing lost, nothing committed replayed
    assert set(map(ident, delivered_not_committed)) <= set(map(ident, got))  # at-least-once
    await assert_quiet(sub2)
    # Per-key order still holds after the resume.
    by_key = defaultdict(list)
    for m in got:
        by_key[m.key].append(int(m.value["etag"].split(":")[1]))
    assert all(v == sorted(v) for v in by_key.values())
    await sub2.close()


async def test_commit_covers_everything_before_it_on_the_partition(harness: Harness):
    bus = harness.bus
    cid = harness.consumer_id("gw")
    for seq in range(10):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("solo", seq), key="solo")
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=cid)
    got = await take(sub, 10)
    await sub.commit(got[6])  # commit only the 7th: 0..6 are applied
    await sub.close()
    sub = await (await harness.peer()).subscribe([TOPIC_ACTIVATION], consumer_id=cid)
    again = await take(sub, 3)
    assert [m.value["etag"] for m in again] == ["solo:7", "solo:8", "solo:9"]
    await assert_quiet(sub)
    await sub.close()


async def test_without_commit_from_beginning_or_end(harness: Harness):
    bus = harness.bus
    for seq in range(3):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", seq), key="w")
    late = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("late"), from_beginning=False)
    early = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("early"))
    for seq in range(3, 5):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w", seq), key="w")
    assert [m.value["etag"] for m in await take(late, 2)] == ["w:3", "w:4"]
    assert [m.value["etag"] for m in await take(early, 5)] == [f"w:{i}" for i in range(5)]
    await assert_quiet(late, 0.1)
    await late.close()
    await early.close()


async def test_end_offsets_count_what_was_published(harness: Harness):
    bus = harness.bus
    for world, n in (("wa", 3), ("wb", 5)):
        for seq in range(n):
            await bus.publish(TOPIC_ACTIVATION, numbered_activation(world, seq), key=world)
    await bus.publish(TOPIC_POLICY, policy_updated("wa", 1), key="wa")
    ends = await bus.end_offsets([TOPIC_ACTIVATION, TOPIC_POLICY])
    assert {topic for topic, _p in ends} == {TOPIC_ACTIVATION, TOPIC_POLICY}
    assert sum(off for (topic, _p), off in ends.items() if topic == TOPIC_ACTIVATION) == 8
    assert sum(off for (topic, _p), off in ends.items() if topic == TOPIC_POLICY) == 1
    # The partition each message landed on ends right after it.
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("ends"))
    got = await take(sub, 8)
    await sub.close()
    last = {}
    for m in got:
        last[(m.topic, m.partition)] = m.offset + 1
    assert all(ends[tp] == off for tp, off in last.items())


async def test_committed_offsets_follow_commits(harness: Harness):
    bus = harness.bus
    cid = harness.consumer_id("gw")
    assert await bus.committed_offsets(cid, [TOPIC_ACTIVATION]) == {}  # never subscribed
    for seq in range(6):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("solo", seq), key="solo")
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=cid)
    got = await take(sub, 6)
    await sub.commit(got[3])
    await sub.close()  # flushes the commits
    committed = await (await harness.peer()).committed_offsets(cid, [TOPIC_ACTIVATION])
    tp = (TOPIC_ACTIVATION, got[3].partition)
    assert committed[tp] == got[3].offset + 1
    # Every other partition is anchored where the identity started (the beginning).
    assert all(off == 0 for other, off in committed.items() if other != tp)
    assert await bus.committed_offsets(harness.consumer_id("other"), [TOPIC_ACTIVATION]) == {}


async def test_invalid_event_refused_on_publish(harness: Harness):
    bus = harness.bus
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("gw"))
    before = bus.invalid_events
    bad = numbered_activation("w1", 1)
    del bad["etag"]  # required
    with pytest.raises(InvalidEvent):
        await bus.publish(TOPIC_ACTIVATION, bad, key="w1")
    with pytest.raises(InvalidEvent):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w1", 2, weight=2.5), key="w1")  # out of range
    with pytest.raises(InvalidEvent):
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("w1", 3, extra={1, 2}), key="w1")  # not JSON
    with pytest.raises(InvalidEvent):
        await bus.publish(TOPIC_QUEUES, numbered_activation("w1", 4), key="w1")  # wrong topic's schema
    assert bus.invalid_events == before + 4
    good = numbered_activation("w1", 5)
    await bus.publish(TOPIC_ACTIVATION, good, key="w1")
    [msg] = await take(sub, 1)
    assert msg.value == good  # nothing invalid reached the bus
    await assert_quiet(sub, 0.2)
    await sub.close()


async def test_invalid_event_on_the_wire_is_skipped_and_counted(harness: Harness):
    bus = harness.bus
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=harness.consumer_id("gw"))
    before = bus.invalid_events
    await harness.raw_publish(TOPIC_ACTIVATION, "w1", b"\xff\xfe{not json")
    await harness.raw_publish(TOPIC_ACTIVATION, "w1", b'["a", "json", "array"]')
    bad = numbered_activation("w1", 1)
    bad["side"] = "sideways"
    import json

    await harness.raw_publish(TOPIC_ACTIVATION, "w1", json.dumps(bad).encode())
    good = numbered_activation("w1", 2)
    await bus.publish(TOPIC_ACTIVATION, good, key="w1")
    [msg] = await take(sub, 1)
    assert msg.value == good
    assert bus.invalid_events == before + 3
    await sub.commit(msg)
    await sub.close()


async def test_skipped_invalid_tail_is_committed(harness: Harness):
    """An invalid last message is committed on the app's behalf: not re-read after a resume."""
    bus = harness.bus
    cid = harness.consumer_id("gw")
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id=cid)
    await bus.publish(TOPIC_ACTIVATION, numbered_activation("w1", 1), key="w1")
    [msg] = await take(sub, 1)
    await sub.commit(msg)
    before = bus.invalid_events
    await harness.raw_publish(TOPIC_ACTIVATION, "w1", b"garbage")
    # The iterator skips it while waiting for the next valid message.
    waiter = asyncio.ensure_future(sub.__anext__())
    await wait_until(lambda: bus.invalid_events == before + 1, what="the invalid event to be skipped")
    await sub.close()  # flushes the commit of the skipped offset
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, WAIT)

    bus2 = await harness.peer()
    sub2 = await bus2.subscribe([TOPIC_ACTIVATION], consumer_id=cid)
    await bus.publish(TOPIC_ACTIVATION, numbered_activation("w1", 2), key="w1")
    [msg2] = await take(sub2, 1)
    assert msg2.value["etag"] == "w1:2"
    assert bus2.invalid_events == (before + 1 if bus2 is bus else 0)  # "garbage" not read again
    await sub2.close()


async def test_same_key_same_partition(harness: Harness):
    bus = harness.bus
    sub = await bus.subscribe([TOPIC_QUEUES], consumer_id=harness.consumer_id("gw"))
    key = queue_key(["eth", "perp"], 300)
    for seq in range(10):
        await bus.publish(TOPIC_QUEUES, numbered_queue_update(["perp", "eth"], 300, seq), key=key)
    got = await take(sub, 10)
    assert len({m.partition for m in got}) == 1
    offsets = [m.offset for m in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == 10
    await sub.close()


async def test_close_ends_iteration(harness: Harness):
    bus = harness.bus
    sub = await bus.subscribe([TOPIC_POLICY], consumer_id=harness.consumer_id("gw"))
    received = []

    async def relay(s):
        async for msg in s:
            received.append(msg)

    task = asyncio.ensure_future(relay(sub))
    await bus.publish(TOPIC_POLICY, policy_updated("w", 1), key="w")
    await wait_until(lambda: len(received) == 1, what="one message")
    await sub.close()
    await asyncio.wait_for(task, WAIT)  # the relay loop ended by itself
    sub2 = await bus.subscribe([TOPIC_POLICY], consumer_id=harness.consumer_id("gw2"))
    task2 = asyncio.ensure_future(relay(sub2))
    await wait_until(lambda: len(received) == 2, what="the message again, for gw2")
    await bus.close()  # closing the bus closes its subscriptions
    await asyncio.wait_for(task2, WAIT)
    assert sub2.closed  # type: ignore[attr-defined]


# -- in-process specifics --------------------------------------------------------------
async def test_inproc_retention_keeps_latest_per_key():
    bus = InProcessBus(partitions=2, retention=5)
    await bus.start()
    for seq in range(50):
        for w in ("a", "b", "c", "d"):
            await bus.publish(TOPIC_ACTIVATION, numbered_activation(w, seq), key=w)
    await bus.publish(TOPIC_ACTIVATION, numbered_activation("e", 0), key="e")
    for seq in range(20):  # push "e" out of the retention window of its partition
        await bus.publish(TOPIC_ACTIVATION, numbered_activation("f", seq), key="f")
    assert bus.retained(TOPIC_ACTIVATION) <= 2 * 5 + 6
    sub = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="late")
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(sub.__anext__(), 0.05))
        except TimeoutError:
            break
    latest = {}
    for m in got:
        latest[m.key] = m.value["etag"]
    # A late subscriber rebuilds current state: the latest event of every key survives.
    assert latest == {"a": "a:49", "b": "b:49", "c": "c:49", "d": "d:49", "e": "e:0", "f": "f:19"}
    by_key = defaultdict(list)
    for m in got:
        by_key[m.key].append(m.offset)
    assert all(v == sorted(v) for v in by_key.values())
    await bus.close()


async def test_inproc_deliveries_do_not_share_mutable_values():
    bus = InProcessBus()
    await bus.start()
    a = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="a")
    b = await bus.subscribe([TOPIC_ACTIVATION], consumer_id="b")
    event = numbered_activation("w", 1)
    await bus.publish(TOPIC_ACTIVATION, event, key="w")
    event["weight"] = 0.9  # the publisher changes its dict afterwards
    [ma], [mb] = await take(a, 1), await take(b, 1)
    ma.value["weight"] = 0.1
    assert mb.value["weight"] == 0.5
    await bus.close()


async def test_inproc_throughput():
    """A loose guard: the embedded path must move tens of thousands of events/s."""
    bus = InProcessBus()
    await bus.start()
    subs = [await bus.subscribe(list(CONTROL_TOPICS), consumer_id=f"gw{i}") for i in range(2)]
    n = 20_000
    events = [numbered_activation(f"w{i % 100}", i) for i in range(n)]

    async def drain(sub):
        count = 0
        async for msg in sub:
            count += 1
            if count % 256 == 0 or count == n:
                await sub.commit(msg)
            if count == n:
                return count

    consumers = [asyncio.ensure_future(drain(s)) for s in subs]
    t0 = time.perf_counter()
    for i, e in enumerate(events):
        await bus.publish(TOPIC_ACTIVATION, e, key=e["world_id"])
        if i % 1000 == 0:
            await asyncio.sleep(0)
    counts = await asyncio.wait_for(asyncio.gather(*consumers), WAIT)
    elapsed = time.perf_counter() - t0
    assert counts == [n, n]
    rate = n / elapsed
    print(f"in-process bus: {rate:,.0f} events/s published and consumed by 2 consumers")
    assert rate > 10_000
    await bus.close()


# -- keys and factory ------------------------------------------------------------------
def test_queue_key_is_stable_and_order_insensitive():
    import hashlib

    k = queue_key(["spot", "btc", "btc"], 60)
    assert k == queue_key(("btc", "spot"), 60)
    assert k == hashlib.sha256(b"btc,spot|60").hexdigest()[:32]
    assert len(k) == 32
    assert k != queue_key(["btc", "spot"], 300)
    with pytest.raises(TypeError):
        queue_key("btc", 60)


def test_partition_key_per_topic():
    assert partition_key(TOPIC_ACTIVATION, numbered_activation("w9", 1)) == "w9"
    assert partition_key(TOPIC_POLICY, policy_updated("w8", 1)) == "w8"
    assert partition_key(TOPIC_QUEUES, numbered_queue_update(["b", "a"], 60, 1)) == queue_key(["a", "b"], 60)
    with pytest.raises(ValueError):
        partition_key("control.unknown", {})


def test_make_bus():
    from qmtl.bus.kafka import KafkaBus

    assert isinstance(make_bus({"kind": "inproc"}, validator=None), InProcessBus)
    assert isinstance(make_bus(None, validator=None), InProcessBus)
    bus = make_bus(
        {"kind": "kafka", "bootstrap_servers": "k1:9092,k2:9092", "num_partitions": 8,
         "reconnect_backoff": [0.2, 2.0], "fetch_max_wait_ms": 20},
        validator=None,
    )
    assert isinstance(bus, KafkaBus) and bus.bootstrap_servers == "k1:9092,k2:9092"
    assert bus._fetch_max_wait_ms == 20
    with pytest.raises(ValueError, match="bootstrap_servers"):
        make_bus({"kind": "kafka"}, validator=None)
    with pytest.raises(ValueError, match="unknown ControlBus kind"):
        make_bus({"kind": "rabbit"}, validator=None)
    with pytest.raises(ValueError, match="partitons"):
        make_bus({"kind": "inproc", "partitons": 3}, validator=None)


async def test_inproc_reader_behind_retention_resumes_from_compacted_state(caplog):
    bus = InProcessBus(partitions=1, retention=4)
    await bus.start()
    sub = await bus.subscribe([TOPIC_POLICY], consumer_id="slow")
    await bus.publish(TOPIC_POLICY, policy_updated("a", 0), key="a")
    [first] = await take(sub, 1)
    await sub.commit(first)
    await sub.close()
    for v in range(1, 11):  # far beyond retention while "slow" is away
        for w in ("a", "b", "c"):
            await bus.publish(TOPIC_POLICY, policy_updated(w, v), key=w)
    sub = await bus.subscribe([TOPIC_POLICY], consumer_id="slow")
    got = await take(sub, 4)
    await assert_quiet(sub, 0.1)
    # The log keeps its last 4 offsets (c:9 a:10 b:10 c:10); nothing older is the
    # latest of its key, so compaction keeps nothing more.
    assert [(m.key, m.value["policy_version"]) for m in got] == [("c", 9), ("a", 10), ("b", 10), ("c", 10)]
    assert "fell behind retention" in caplog.text
    await bus.close()
