"""Fan-out hub: serialise once, scoping, bounded buffers and drops, resume from the ring."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from qmtl.contracts.events import schema_validator
from qmtl.gateway.events.hub import (
    KIND_ACTIVATION,
    KIND_INGEST,
    KIND_POLICY,
    KIND_QUEUES,
    KIND_SENTINEL,
    ClientBuffer,
    Hub,
    Subscriber,
    parse_event_id,
)
from qmtl.gateway.events.metrics import EventMetrics

FRAME = schema_validator("ws_frame.schema.json")
KEY = (("btc",), 60, "any")
DATA = {"tags": ["btc"], "interval": 60, "queues": ["q"], "match_mode": "any"}


def hub(**kw) -> tuple[Hub, EventMetrics, CollectorRegistry]:
    reg = CollectorRegistry()
    m = EventMetrics.create(reg)
    return Hub(m, source="qmtl.gateway/t", **kw), m, reg


def evt(world="w1", **kw):
    return Subscriber("/ws/evt", world_id=world, snapshots=True, world_visible=lambda w: False, **kw)


def test_scope_of_descriptor_and_legacy_subscribers():
    a = evt(topics=["activation"], strategy_id="s-1")
    q = evt(world=None, topics=["queues"], queue_keys=[KEY])
    legacy_all = Subscriber("/ws")
    legacy_reader = Subscriber("/ws", world_visible=lambda w: w == "w2")
    cases = {
        (KIND_ACTIVATION, "w1", None, None): (True, False, True, False),
        (KIND_ACTIVATION, "w2", None, None): (False, False, True, True),
        (KIND_POLICY, "w1", None, None): (False, False, True, False),
        (KIND_QUEUES, None, KEY, None): (False, True, True, True),
        (KIND_QUEUES, None, (("eth",), 60, "any"), None): (False, False, True, True),
        (KIND_SENTINEL, None, None, None): (True, False, True, True),
        (KIND_INGEST, None, None, "s-1"): (True, False, True, True),
        (KIND_INGEST, None, None, "s-2"): (False, False, True, True),
    }
    for meta, expected in cases.items():
        assert tuple(s.wants(meta) for s in (a, q, legacy_all, legacy_reader)) == expected, meta


def test_publish_serialises_once_and_numbers_frames():
    h, _m, reg = hub()
    subs = [evt(world=None, topics=["queues"]) for _ in range(3)]
    for s in subs:
        h.attach(s)
    assert h.publish("queue_update", DATA, (KIND_QUEUES, None, KEY, None), subject="k/any", extensions={"statehash": "abc"}) == 3
    texts = [s.buffer.items[0] for s in subs]
    assert texts[0] is texts[1] is texts[2]  # one encoded str for everyone
    frame = json.loads(texts[0])
    assert FRAME.is_valid(frame) and frame["seq"] == 1 and frame["id"] == f"{h.epoch}.1" and frame["statehash"] == "abc"
    assert reg.get_sample_value("event_fanout_total", {"topic": "queues"}) == 3
    assert reg.get_sample_value("gateway_events_relayed_total", {"type": "queue_update"}) == 1


def test_overflow_drops_only_the_slow_subscriber():
    h, _m, reg = hub(queue_size=4)
    fast, slow = evt(world=None, topics=["queues"], queue_size=4), evt(world=None, topics=["queues"], queue_size=4)
    h.attach(fast)
    h.attach(slow)
    dropped = []
    h._on_drop = dropped.append
    for _i in range(6):
        h.publish("queue_update", DATA, (KIND_QUEUES, None, KEY, None))
        fast.buffer.items.clear()  # the fast one keeps up
    assert dropped == [slow] and slow.dropped and not fast.dropped
    assert h.subscribers == [fast]
    assert reg.get_sample_value("ws_dropped_subscribers_total", {"route": "/ws/evt"}) == 1
    assert reg.get_sample_value("ws_subscribers", {"route": "/ws/evt"}) == 1


def test_resume_from_the_ring_or_snapshot():
    h, _m, _reg = hub(replay_size=5)
    for i in range(3):
        h.publish("activation_updated", {"n": i}, (KIND_ACTIVATION, "w1" if i != 1 else "w2", None, None))
    def snap(sub, head):
        return [f"snapshot@{head}"]
    s = evt(topics=["activation"])
    assert h.attach(s, last_event_id=f"{h.epoch}.1", snapshot=snap) == "resumed"
    assert [json.loads(t)["data"]["n"] for t in s.buffer.items] == [2]  # frame 2 was another world's
    s = evt(topics=["activation"])
    assert h.attach(s, last_event_id=f"{h.epoch}.3", snapshot=snap) == "resumed" and not s.buffer.items
    s = evt(topics=["activation"])
    assert h.attach(s, last_event_id="ffffffffffff.2", snapshot=snap) == "snapshot"  # another process
    assert list(s.buffer.items) == ["snapshot@3"]
    for i in range(5):
        h.publish("activation_updated", {"n": i}, (KIND_ACTIVATION, "w1", None, None))
    s = evt(topics=["activation"])
    assert h.attach(s, last_event_id=f"{h.epoch}.2", snapshot=snap) == "snapshot"  # frames 3 was evicted
    s = evt(topics=["activation"])
    assert h.attach(s, last_event_id=f"{h.epoch}.99", snapshot=snap) == "snapshot"  # from the future
    assert parse_event_id("abc.12.snapshot-queues") == ("abc", 12) and parse_event_id("nope") is None


def test_heartbeat_frames_valid_and_counted():
    h, _m, _reg = hub()
    s = evt(topics=["activation"])
    h.attach(s)
    h.heartbeat()
    frame = json.loads(s.buffer.items[0])
    assert frame["type"] == "heartbeat" and FRAME.is_valid(frame)


async def test_client_buffer_wakes_its_writer():
    buf = ClientBuffer(2)
    waiter = asyncio.create_task(buf.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    assert buf.push("a") and buf.push("b") and not buf.push("c")
    await asyncio.wait_for(waiter, 1)
    assert list(buf.items) == ["a", "b"]


def test_a_burst_of_closes_returns_memory_once():
    from qmtl.gateway.events.memory import MemoryTrimmer

    scheduled: list = []
    calls: list[str] = []
    trimmer = MemoryTrimmer(delay=1.0, trim=lambda: calls.append("trim") or 1, collect=lambda: calls.append("collect") or 0,
                            schedule=lambda delay, cb: scheduled.append((delay, cb)))
    h, _m, _reg = hub(trimmer=trimmer)
    subs = [evt() for _ in range(50)]
    for s in subs:
        h.attach(s)
    assert scheduled == []  # opening costs nothing
    for s in subs:
        h.detach(s)
    h.detach(subs[0])  # a second detach of the same subscriber is no close
    assert len(scheduled) == 1 and scheduled[0][0] == 1.0  # 50 closes: one pass
    scheduled.pop()[1]()
    assert calls == ["collect", "trim"] and trimmer.passes == 1 and not trimmer.pending
    h.attach(subs[0])
    h.drop(subs[0])  # a drop is a close too: the next burst schedules its own pass
    assert len(scheduled) == 1


def test_a_slow_memory_pass_spaces_out_the_next():
    from qmtl.common.clock import ManualClock
    from qmtl.gateway.events.memory import MAX_DUTY, MemoryTrimmer

    clock = ManualClock()
    scheduled: list = []
    t = MemoryTrimmer(delay=1.0, trim=None, collect=lambda: clock.advance(0.05) or 0, monotonic=clock.monotonic,
                      schedule=lambda delay, cb: scheduled.append(delay))
    t.closed()
    t.run()  # a 50 ms pass
    t.closed()
    assert scheduled[0] == 1.0 and scheduled[1] == pytest.approx(0.05 / MAX_DUTY)


def test_memory_trimmer_without_malloc_trim_or_loop():
    from qmtl.gateway.events.memory import MemoryTrimmer, libc_malloc_trim

    assert libc_malloc_trim() is None or callable(libc_malloc_trim())
    collected: list[int] = []

    def no_loop(_delay, _cb):
        raise RuntimeError("no running event loop")

    # a C library without malloc_trim (musl, macOS): the collection still runs
    t = MemoryTrimmer(trim=None, collect=lambda: collected.append(1) or 0, schedule=no_loop)
    t.closed()  # outside a loop: nothing scheduled, nothing raised
    assert not t.pending and collected == []
    t.run()
    assert collected == [1] and t.passes == 1
