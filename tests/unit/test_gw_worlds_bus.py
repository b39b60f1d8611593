"""Caches that follow the bus (SPEC §4): a PolicyUpdated / ActivationUpdated consumed by a
Gateway drops its cached decide and activation entries for that world, and an upstream read
that was in flight when the event arrived does not put the superseded answer back."""

from __future__ import annotations

import asyncio

import httpx

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_POLICY
from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import load_config
from qmtl.contracts.events import event_validators
from qmtl.gateway.app import create_app
from qmtl.gateway.worlds import WorldLRU
from tests.helpers.bus import wait_until
from tests.unit.test_gw_worlds import ENVELOPE, NOBODY, Upstream, proxy_for


def versioned(version: int, etag: str, world: str = "w1") -> dict:
    return {**ENVELOPE, "world_id": world, "policy_version": version, "etag": etag}


class Change:
    def __init__(self, world_id: str) -> None:
        self.world_id = world_id


def test_world_lru_drops_one_world_and_stays_bounded():
    lru = WorldLRU(4)
    for key in [("a", "1"), ("a", "2"), ("b", "1"), ("c", "1")]:
        lru.put(key, key)
    lru.put(("c", "2"), "x")  # evicts ("a", "1")
    assert lru.get(("a", "1")) is None and len(lru) == 4
    assert lru.drop_world("a") == 1 and lru.get(("a", "2")) is None
    assert lru.get(("b", "1")) == ("b", "1") and lru.drop_world("a") == 0
    lru.pop(("b", "1"))
    assert lru.drop_world("b") == 0 and len(lru) == 2


async def test_a_world_change_drops_the_world_s_decisions_and_activations_only():
    current = {"w1": versioned(1, "v1"), "w2": versioned(1, "o1", "w2")}

    def decide(request: httpx.Request) -> httpx.Response:
        env = current[request.url.path.split("/")[2]]
        return httpx.Response(200, json=env, headers={"ETag": f'"{env["etag"]}"'})

    act = {"world_id": "w1", "strategy_id": "s1", "side": "long", "active": True, "weight": 1.0, "etag": "a1",
           "ts": "2026-01-01T00:00:00Z"}
    up = Upstream({"/worlds/w1/decide": decide, "/worlds/w2/decide": decide,
                   "/worlds/w1/activation": httpx.Response(200, json=act, headers={"ETag": '"a1"'})})
    proxy = proxy_for(up)
    assert (await proxy.decide("w1", NOBODY)).data()["policy_version"] == 1
    assert (await proxy.decide("w2", NOBODY)).headers["X-QMTL-Cache"] == "miss"
    await proxy.activation("w1", NOBODY, "s1", "long")
    current["w1"] = versioned(2, "v2")
    hit = await proxy.decide("w1", NOBODY)
    assert hit.headers["X-QMTL-Cache"] == "hit" and hit.data()["policy_version"] == 1  # nothing consumed yet

    proxy.world_changed(Change("w1"))
    assert proxy.activations.get(("w1", "s1", "long")) is None
    after = await proxy.decide("w1", NOBODY)
    assert after.headers["X-QMTL-Cache"] == "miss" and after.data()["policy_version"] == 2
    assert (await proxy.decide("w2", NOBODY)).headers["X-QMTL-Cache"] == "hit"  # other worlds keep theirs


async def test_a_read_in_flight_when_the_event_arrives_does_not_refill_the_cache():
    release = asyncio.Event()
    started = asyncio.Event()
    answers = [versioned(1, "v1"), versioned(2, "v2")]

    async def decide(request: httpx.Request) -> httpx.Response:
        env = answers.pop(0)
        if env["policy_version"] == 1:  # the old answer is slow: the event lands meanwhile
            started.set()
            await release.wait()
        return httpx.Response(200, json=env, headers={"ETag": f'"{env["etag"]}"'})

    up = Upstream({"/worlds/w1/decide": decide})
    proxy = proxy_for(up)
    slow = asyncio.create_task(proxy.decide("w1", NOBODY))
    await started.wait()
    proxy.world_changed(Change("w1"))
    # A request after the event does not join the read that started before it.
    fresh = asyncio.create_task(proxy.decide("w1", NOBODY))
    await asyncio.sleep(0)
    release.set()
    old, new = await slow, await fresh
    assert old.data()["policy_version"] == 1 and new.data()["policy_version"] == 2
    cached = proxy.decisions.get(("w1", ""))
    assert cached is not None and cached.envelope["policy_version"] == 2
    hit = await proxy.decide("w1", NOBODY)
    assert hit.headers["X-QMTL-Cache"] == "hit" and hit.data()["policy_version"] == 2
    assert len(up.calls) == 2


async def test_events_consumed_from_the_bus_reach_the_worlds_cache_of_the_gateway(tmp_path):
    """The wiring of the app factory: a PolicyUpdated / ActivationUpdated published on the bus
    (by any WorldService, through any Gateway) empties this Gateway's entries of the world."""
    bus = InProcessBus(validator=event_validators())
    cfg = load_config(environ={}, overrides={"data_dir": str(tmp_path), "gateway": {"worldservice_url": "http://ws"}})
    app = create_app(cfg, bus=bus, parts=["auth", "worlds", "events", "status"])
    ctx = app.service
    await bus.start()
    await ctx.start()
    try:
        proxy = ctx.worlds
        entry = object()
        for topic, event in [
            (TOPIC_POLICY, {"type": "PolicyUpdated", "version": 1, "world_id": "w1", "policy_version": 2,
                            "checksum": "c" * 64, "status": "ACTIVE", "ts": "2026-01-01T00:00:01Z"}),
            (TOPIC_ACTIVATION, {"type": "ActivationUpdated", "version": 1, "world_id": "w1", "strategy_id": "s1", "side": "long",
                                "active": True, "weight": 1.0, "etag": "a2", "ts": "2026-01-01T00:00:02Z"}),
        ]:
            proxy.decisions.put(("w1", ""), entry)
            proxy.decisions.put(("w1", "2026-01-01T00:00:00Z"), entry)
            proxy.activations.put(("w1", "s1", "long"), entry)
            proxy.decisions.put(("w9", ""), entry)
            await bus.publish(topic, event, key="w1")
            await wait_until(lambda: proxy.decisions.get(("w1", "")) is None, 10, what=f"{topic} to drop w1's decisions")
            assert proxy.decisions.get(("w1", "2026-01-01T00:00:00Z")) is None
            assert proxy.activations.get(("w1", "s1", "long")) is None
            assert proxy.decisions.get(("w9", "")) is entry
    finally:
        await ctx.stop()
        await bus.close()
