"""ControlBus consumer: commits after apply, silent rebuild up to the committed offsets,
offset lag and partition skew from the partitions' end offsets (in-process bus)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from qmtl.bus import InProcessBus
from qmtl.contracts.events import event_validators
from qmtl.gateway.events.consumer import ControlBusConsumer
from qmtl.gateway.events.metrics import EventMetrics
from tests.helpers.events import activation_updated


def ev(world, i):
    return activation_updated(world, f"s{i}", etag=f"e{i}", ts="2026-11-26T12:00:00Z")


async def _until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_commit_after_apply_then_rebuild_and_resume():
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    reg = CollectorRegistry()
    metrics = EventMetrics.create(reg)
    applied: list[tuple[str, bool]] = []

    def apply(topic, event, relay):
        applied.append((event["etag"], relay))
        return "applied"

    for i in range(4):
        await bus.publish("control.activation", ev(f"w{i}", i), key=f"w{i}")
    c = ControlBusConsumer(bus, apply, consumer_id="gateway-x", epoch="e1", metrics=metrics)
    c.commit_interval = 0.05
    await c.start()
    await _until(lambda: len(applied) == 4)
    await _until(lambda: sum(bus.committed("gateway-x", "control.activation", p) or 0 for p in range(4)) == 4)
    assert all(relay for _, relay in applied)
    assert reg.get_sample_value("controlbus_lag_ms", {"topic": "control.activation"}) >= 0
    await c.stop()

    await bus.publish("control.activation", ev("w9", 9), key="w9")
    applied.clear()
    c2 = ControlBusConsumer(bus, apply, consumer_id="gateway-x", epoch="e2", metrics=metrics)
    await c2.start()
    await _until(lambda: len(applied) == 5)
    # the 4 committed ones replayed silently, then only the new one relayed
    assert sorted(e for e, relay in applied if not relay) == ["e0", "e1", "e2", "e3"]
    assert [e for e, relay in applied if relay] == ["e9"]
    assert c2.stats["rebuilt"] == 4 and c2.stats["consumed"] == 1
    lag = await c2.update_lag_metrics()
    assert lag == {"control.activation": 0, "control.policy": 0, "control.queues": 0}
    await c2.stop()
    await bus.close()


async def test_offset_lag_and_partition_skew():
    bus = InProcessBus(validator=event_validators(), partitions=2)
    await bus.start()
    reg = CollectorRegistry()
    c = ControlBusConsumer(bus, lambda *a: "applied", consumer_id="gateway-y", epoch="e", metrics=EventMetrics.create(reg))
    p0 = bus.partition_for("a")
    key_other = next(k for k in (f"k{i}" for i in range(100)) if bus.partition_for(k) != p0)
    for _ in range(3):
        await bus.publish("control.activation", ev("a", 1), key="a")
    await bus.publish("control.activation", ev("b", 2), key=key_other)
    now = time.time()
    c.applied[("control.activation", p0)] = (1, now - 10)  # 2 behind, last applied 10 s ago
    c.applied[("control.activation", 1 - p0)] = (1, now)  # caught up
    lag = await c.update_lag_metrics()
    assert lag["control.activation"] == 2
    assert reg.get_sample_value("controlbus_consumer_offset_lag", {"topic": "control.activation"}) == 2
    skew = reg.get_sample_value("partition_skew_seconds", {"topic": "control.activation"})
    assert 9.5 < skew < 11
    await bus.close()


async def test_ready_only_after_catching_up_with_what_was_on_the_bus():
    bus = InProcessBus(validator=event_validators())
    await bus.start()
    for i in range(700):
        await bus.publish("control.activation", ev(f"w{i % 7}", i), key=f"w{i % 7}")
    seen: list[int] = []
    c = ControlBusConsumer(bus, lambda t, e, r: seen.append(1) or "applied", consumer_id="gateway-new", epoch="e",
                           metrics=EventMetrics.create(CollectorRegistry()))
    await c.start()
    await asyncio.wait_for(c.ready.wait(), 10)
    assert len(seen) == 700  # a snapshot now is of everything published before the start
    await c.stop()
    await bus.close()
