"""Gateway event stream over the ControlBus wire: the same tests on the in-process bus and on
Kafka (librdkafka's mock cluster): publish → consume → relay to WebSocket clients, per-key
order, duplicates and out-of-order delivery, commit and resume after a restart, the broker
away and back, and two Gateways on one bus both relaying everything."""

from __future__ import annotations

import asyncio
import time

import pytest

from qmtl.bus.base import CONTROL_TOPICS
from qmtl.bus.keys import queue_key
from qmtl.common.statehash import activation_state_hash, policy_state_hash
from qmtl.gateway.events.state import queue_state_hash
from tests.helpers.gateway_events import (
    BusFactory,
    Gateway,
    activation,
    connect,
    expect_silence,
    gateways,
    policy,
    queues_event,
    recv,
    recv_n,
)
from tests.helpers.sdk_ws_client import WebSocketClient
from tests.kafka_mock import kafka_bootstrap, kafka_cluster  # noqa: F401  (module-scoped fixtures)


@pytest.fixture(params=["inproc", "kafka"])
async def buses(request):
    bootstrap = request.getfixturevalue("kafka_bootstrap") if request.param == "kafka" else None
    factory = BusFactory(request.param, bootstrap)
    try:
        yield factory
    finally:
        await factory.close()


async def _publisher(buses: BusFactory):
    bus = buses.make()
    await bus.start()
    return bus


def _act_hash(entries):
    return activation_state_hash(entries)


# ---------------------------------------------------------------------------------------
async def test_publish_consume_relay_with_snapshot_scope_and_state_hashes(buses, tmp_path):
    pub = await _publisher(buses)
    # State that exists before the subscriber connects: it must arrive as the snapshot.
    await pub.publish("control.activation", activation("w1", "s1", 1, weight=0.25), key="w1")
    await pub.publish("control.policy", policy("w1", 1, "ACTIVE", 1), key="w1")
    await pub.publish("control.queues", queues_event(["btc", "price"], 60, ["q1"], 1), key=queue_key(["btc", "price"], 60))
    async with gateways(buses, tmp_path) as (gw,):
        await gw.wait_applied(3)
        d = await gw.descriptor({"world_id": "w1", "topics": ["activation", "policy", "queue"],
                                 "queue_keys": [{"tags": ["price", "btc"], "interval": 60}]})
        assert d["stream_url"] == gw.ws_url + "/ws/evt" and d["fallback_url"] == gw.ws_url + "/ws"
        assert d["topics"] == ["activation", "policy", "queues"]
        ws = await connect(d["stream_url"], d["token"])
        snaps = await recv_n(ws, 3)
        assert [f["type"] for f in snaps] == ["snapshot"] * 3
        by_topic = {f["data"]["topic"]: f["data"] for f in snaps}
        act = by_topic["activation"]
        assert [i["strategy_id"] for i in act["items"]] == ["s1"]
        assert act["state_hash"] == _act_hash([{"strategy_id": "s1", "side": "long", "active": True, "weight": 0.25}])
        assert by_topic["policy"]["state_hash"] == policy_state_hash("w1", 1, "sha256:1", "ACTIVE")
        q_item = by_topic["queues"]["items"][0]
        assert q_item["queues"] == ["q1"] and q_item["state_hash"] == queue_state_hash((("btc", "price"), 60, "any"), ["q1"])

        # Changes in scope arrive in order, each with the hash of the state after it.
        await pub.publish("control.activation", activation("w1", "s2", 2, weight=0.75), key="w1")
        await pub.publish("control.activation", activation("w2", "s9", 3), key="w2")  # other world: not delivered
        await pub.publish("control.queues", queues_event(["btc", "price"], 60, ["q1", "q2"], 4), key=queue_key(["btc", "price"], 60))
        await pub.publish("control.queues", queues_event(["eth"], 60, ["q9"], 5), key=queue_key(["eth"], 60))  # other key
        await pub.publish("control.policy", policy("w1", 2, "ACTIVE", 6), key="w1")
        frames = await recv_n(ws, 3)
        await expect_silence(ws)
        by_type = {f["type"]: f for f in frames}
        assert set(by_type) == {"activation_updated", "queue_update", "policy_updated"}
        a = by_type["activation_updated"]
        assert a["data"]["strategy_id"] == "s2" and a["specversion"] == "1.0" and a["datacontenttype"] == "application/json"
        assert a["statehash"] == _act_hash([{"strategy_id": "s1", "side": "long", "active": True, "weight": 0.25},
                                            {"strategy_id": "s2", "side": "long", "active": True, "weight": 0.75}])
        q = by_type["queue_update"]["data"]
        assert q == {"tags": ["btc", "price"], "interval": 60, "queues": ["q1", "q2"], "match_mode": "any", "etag": "q-4"}
        assert by_type["queue_update"]["statehash"] == queue_state_hash((("btc", "price"), 60, "any"), ["q1", "q2"])
        assert by_type["policy_updated"]["statehash"] == policy_state_hash("w1", 2, "sha256:2", "ACTIVE")
        # The probes answer the same hashes.
        assert gw.events.state_hash("activation", world_id="w1") == a["statehash"]
        import httpx
        async with httpx.AsyncClient(base_url=gw.url) as c:
            r = await c.get("/queues/state_hash", params={"tags": "btc,price", "interval": 60})
        assert r.status_code == 200 and r.json()["state_hash"] == by_type["queue_update"]["statehash"]
        seqs = [f["seq"] for f in frames]
        assert seqs == sorted(seqs) and all(f["id"].endswith(f".{f['seq']}") for f in frames)
        assert await gw.metric("event_fanout_total", topic="activation") >= 1
        assert await gw.metric("ws_subscribers", route="/ws/evt") == 1
        await ws.close()
    await asyncio.sleep(0)


async def test_unmodified_sdk_client_on_both_routes(buses, tmp_path):
    pub = await _publisher(buses)
    async with gateways(buses, tmp_path) as (gw,):
        d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
        got_evt: list[dict] = []
        got_legacy: list[dict] = []

        async def on_evt(msg):
            got_evt.append(msg)

        async def on_legacy(msg):
            got_legacy.append(msg)

        got_legacy_token: list[dict] = []

        async def on_legacy_token(msg):
            got_legacy_token.append(msg)

        evt = WebSocketClient(d["stream_url"], on_message=on_evt, token=d["token"])
        legacy = WebSocketClient(gw.ws_url + "/ws", on_message=on_legacy)  # dev mode: no token
        legacy_token = WebSocketClient(d["fallback_url"], on_message=on_legacy_token, token=d["token"])  # the fallback route
        await evt.start()
        await legacy.start()
        await legacy_token.start()
        try:
            deadline = time.monotonic() + 10
            while not (evt.connections and legacy.connections and got_evt and len(gw.events.hub.subscribers) == 3):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await pub.publish("control.activation", activation("w1", "s1", 1), key="w1")
            deadline = time.monotonic() + 10
            while not (any(m["type"] == "activation_updated" for m in got_legacy) and len(got_evt) >= 2):
                assert time.monotonic() < deadline, (got_evt, got_legacy)
                await asyncio.sleep(0.02)
            import httpx
            async with httpx.AsyncClient(base_url=gw.url) as c:
                r = await c.post("/callbacks/dag-event", json={"event": "sentinel_weight", "data": {"sentinel_id": "sen-1", "weight": 0.4}},
                                 headers=gw.service_headers)
                assert r.status_code == 202, r.text
            deadline = time.monotonic() + 10
            while not (evt.sentinel_weights and legacy.sentinel_weights and any(m["type"] == "activation_updated" for m in got_legacy)):
                assert time.monotonic() < deadline, (got_evt, got_legacy)
                await asyncio.sleep(0.02)
            while not legacy_token.sentinel_weights:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            await evt.stop()
            await legacy.stop()
            await legacy_token.stop()
        assert [m["type"] for m in got_legacy_token] == ["activation_updated", "sentinel_weight"]
        assert evt.sentinel_weights == {"sen-1": 0.4} and legacy.sentinel_weights == {"sen-1": 0.4}
        assert [m["type"] for m in got_evt][:1] == ["snapshot"]
        assert [m["type"] for m in got_evt if m["type"] != "snapshot"] == ["activation_updated", "sentinel_weight"]
        assert [m["type"] for m in got_legacy] == ["activation_updated", "sentinel_weight"]  # legacy: no snapshot
        assert got_legacy[0]["data"] == got_evt[1]["data"]
        assert await gw.metric("ws_dropped_subscribers_total", route="/ws") == 0  # normal closes are not drops


async def test_per_key_order_duplicates_and_out_of_order(buses, tmp_path):
    pub = await _publisher(buses)
    async with gateways(buses, tmp_path) as (gw,):
        d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
        ws = await connect(d["stream_url"], d["token"])
        assert (await recv(ws))["type"] == "snapshot"
        e = [activation("w1", "s1", i, weight=i / 10) for i in range(1, 6)]
        for ev in e[:3]:
            await pub.publish("control.activation", ev, key="w1")
        await pub.publish("control.activation", e[1], key="w1")  # redelivered duplicate (same etag)
        await pub.publish("control.activation", activation("w1", "s1", 0, weight=0.99), key="w1")  # older than held: stale
        for ev in e[3:]:
            await pub.publish("control.activation", ev, key="w1")
        await pub.publish("control.activation", e[4], key="w1")  # duplicate of the latest
        # The same event through the compatibility callback is the same relay path: a no-op.
        import httpx
        async with httpx.AsyncClient(base_url=gw.url) as c:
            await gw.wait_applied(8)
            r = await c.post("/callbacks/dag-event", json=e[4], headers=gw.service_headers)
            assert r.status_code == 202 and r.json() == {"accepted": True, "duplicate": True}
        frames = await recv_n(ws, 5)
        await expect_silence(ws)
        assert [f["data"]["etag"] for f in frames] == [ev["etag"] for ev in e]
        assert [f["data"]["weight"] for f in frames] == [0.1, 0.2, 0.3, 0.4, 0.5]
        assert await gw.metric("controlbus_events_total", topic="control.activation", outcome="duplicate", source="controlbus") == 2
        assert await gw.metric("controlbus_events_total", topic="control.activation", outcome="stale", source="controlbus") == 1
        await ws.close()


async def test_commit_and_resume_after_restart_nothing_lost(buses, tmp_path):
    pub = await _publisher(buses)
    gw = Gateway(buses.make(), str(tmp_path / "a"), instance_id="gw-restart")
    await gw.start()
    try:
        for i in range(1, 6):
            await pub.publish("control.activation", activation("w1", f"s{i}", i), key="w1")
        await gw.wait_applied(5)
        # Offsets are committed after apply.
        deadline = time.monotonic() + 10
        while True:
            committed = await gw.events.consumer.bus.committed_offsets("gateway-gw-restart", CONTROL_TOPICS)
            if sum((committed or {}).values()) >= 5:
                break
            assert time.monotonic() < deadline, committed
            await asyncio.sleep(0.1)
    finally:
        await gw.stop()
    # Published while the Gateway is away.
    for i in range(6, 9):
        await pub.publish("control.activation", activation("w1", f"s{i}", i), key="w1")
    gw2 = Gateway(buses.make() if buses.kind == "kafka" else gw.bus, str(tmp_path / "a"), instance_id="gw-restart")
    await gw2.start()
    try:
        stats = gw2.events.consumer.stats
        assert stats["rebuilt"] == 5  # state rebuilt up to the committed offsets, silently
        await gw2.wait_applied(3)  # then resumed at the committed offsets: only the 3 new ones
        d = await gw2.descriptor({"world_id": "w1", "topics": ["activation"]})
        ws = await connect(d["stream_url"], d["token"])
        snap = await recv(ws)
        assert sorted(i["strategy_id"] for i in snap["data"]["items"]) == sorted(f"s{i}" for i in range(1, 9))
        await pub.publish("control.activation", activation("w1", "s9", 9), key="w1")
        live = await recv(ws)
        assert live["type"] == "activation_updated" and live["data"]["strategy_id"] == "s9"
        assert gw2.events.consumer.stats["consumed"] == 4
        await ws.close()
    finally:
        await gw2.stop()


async def test_two_gateways_on_one_bus_both_relay_every_event(buses, tmp_path):
    pub = await _publisher(buses)
    async with gateways(buses, tmp_path, n=2) as (g1, g2):
        assert g1.events.consumer_id != g2.events.consumer_id
        sockets = []
        for g in (g1, g2):
            d = await g.descriptor({"world_id": "w1", "topics": ["activation"]})
            ws = await connect(d["stream_url"], d["token"])
            assert (await recv(ws))["type"] == "snapshot"
            sockets.append(ws)
        events = [activation("w1", f"s{i % 3}", i, weight=(i % 10) / 10) for i in range(1, 21)]
        for ev in events:
            await pub.publish("control.activation", ev, key="w1")
        for ws in sockets:
            frames = await recv_n(ws, 20)
            assert [f["data"]["etag"] for f in frames] == [ev["etag"] for ev in events]
            await ws.close()


async def test_resume_with_last_event_id_or_fresh_snapshot(buses, tmp_path):
    pub = await _publisher(buses)
    async with gateways(buses, tmp_path) as (gw,):
        d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
        ws = await connect(d["stream_url"], d["token"])
        await recv(ws)
        await pub.publish("control.activation", activation("w1", "s1", 1), key="w1")
        last = await recv(ws)
        await ws.close()
        for i in range(2, 5):
            await pub.publish("control.activation", activation("w1", f"s{i}", i), key="w1")
        await pub.publish("control.activation", activation("w2", "x", 5), key="w2")
        await gw.wait_applied(5)
        # Resume: exactly the missed frames in scope, no snapshot.
        ws = await connect(f"{d['stream_url']}?last_event_id={last['id']}", d["token"])
        frames = await recv_n(ws, 3)
        assert [f["data"]["strategy_id"] for f in frames] == ["s2", "s3", "s4"]
        await expect_silence(ws)
        await ws.close()
        # Unknown position (another replica, a restart): a fresh, full snapshot.
        ws = await connect(f"{d['stream_url']}?last_event_id=0123456789ab.3", d["token"])
        snap = await recv(ws)
        assert snap["type"] == "snapshot" and len(snap["data"]["items"]) == 4
        await ws.close()
        assert await gw.metric("ws_connections_total", route="/ws/evt", start="resumed") == 1


class _FlakyBus:
    """An in-process bus whose 'broker' can go away: open subscriptions end and new ones
    are refused until it is back (what a Kafka outage looks like to the consumer)."""

    def __init__(self, inner):
        self.inner = inner
        self.down = False
        self.refused = 0
        self._subs = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def start(self):
        await self.inner.start()

    async def close(self):
        await self.inner.close()

    async def publish(self, topic, value, *, key, headers=None):
        from qmtl.bus import BusUnavailable

        if self.down:
            raise BusUnavailable("broker away")
        await self.inner.publish(topic, value, key=key, headers=headers)

    async def subscribe(self, topics, *, consumer_id, from_beginning=True):
        from qmtl.bus import BusUnavailable

        if self.down:
            self.refused += 1
            raise BusUnavailable("broker away")
        sub = await self.inner.subscribe(topics, consumer_id=consumer_id, from_beginning=from_beginning)
        self._subs.append(sub)
        return sub

    async def go_down(self):
        self.down = True
        for sub in self._subs:
            await sub.close()
        self._subs.clear()


async def test_broker_unavailable_then_back(buses, tmp_path):
    cluster = None
    if buses.kind == "kafka":
        from tests.helpers.gateway_events import BusFactory as _BF
        from tests.kafka_mock import start_mock_cluster

        cluster = start_mock_cluster()  # its own cluster: this test takes the broker down
        buses = _BF("kafka", cluster.bootstrap_servers)
        gw_bus = buses.make()
        pub = buses.make()
    else:
        gw_bus = _FlakyBus(buses.make())
        pub = gw_bus.inner
    await pub.start()
    try:
        async with Gateway(gw_bus, str(tmp_path / "gw")) as gw:
            d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
            ws = await connect(d["stream_url"], d["token"])
            await recv(ws)
            await pub.publish("control.activation", activation("w1", "s1", 1), key="w1")
            assert (await recv(ws))["data"]["strategy_id"] == "s1"
            if cluster is not None:
                cluster.broker_down()
                await asyncio.sleep(1.5)
                # Published while the broker is away: the producer holds it until it is back.
                late = asyncio.create_task(pub.publish("control.activation", activation("w1", "s2", 2), key="w1"))
                await asyncio.sleep(0.5)
                cluster.broker_up()
                await asyncio.wait_for(late, 30)
            else:
                await gw_bus.go_down()
                await asyncio.sleep(0.5)
                assert gw_bus.refused >= 1  # the consumer keeps trying, with backoff
                await pub.publish("control.activation", activation("w1", "s2", 2), key="w1")
                gw_bus.down = False
            assert (await recv(ws, 30))["data"]["strategy_id"] == "s2"
            await pub.publish("control.activation", activation("w1", "s3", 3), key="w1")
            assert (await recv(ws, 15))["data"]["strategy_id"] == "s3"
            await expect_silence(ws)  # nothing twice after the reconnect
            await ws.close()
    finally:
        await buses.close()
        if cluster is not None:
            cluster.stop()
