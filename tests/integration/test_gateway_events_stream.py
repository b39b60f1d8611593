"""Gateway event stream: descriptors and tokens, refusals (1008/1013), slow clients (4008),
heartbeats, the legacy route's authentication, the compatibility callback, local relays
(ingest frames) and queue keys resolved at the DAG Manager. In-process bus (the bus itself
is covered in test_gateway_events.py on both buses)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qmtl.bus import InProcessBus
from qmtl.common.keys import SigningKey
from qmtl.contracts.events import event_validators, schema_validator
from tests.helpers.gateway_events import (
    Gateway,
    StalledClient,
    activation,
    close_code,
    connect,
    expect_silence,
    queues_event,
    recv,
    recv_n,
)

FRAME = schema_validator("ws_frame.schema.json")



@pytest.fixture
async def bus():
    b = InProcessBus(validator=event_validators())
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def make_gw(bus, tmp_path):
    started: list[Gateway] = []

    async def make(**kw) -> Gateway:
        g = Gateway(bus, str(tmp_path / f"gw{len(started)}"), **kw)
        started.append(g)
        return await g.start()

    yield make
    for g in started:
        await g.stop()


def _valid(frame: dict) -> dict:
    assert FRAME.is_valid(frame), FRAME.errors(frame)
    return frame


# -- descriptors and tokens -----------------------------------------------------------------
async def test_descriptor_token_claims_jwks_and_urls(make_gw):
    gw = await make_gw(gateway={"public_url": "https://gw.example.com/base/"})
    async with httpx.AsyncClient(base_url=gw.url) as c:
        r = await c.post("/events/subscribe", json={"world_id": "w1", "strategy_id": "s-1", "topics": ["activation", "queue"]})
        assert r.status_code == 200, r.text
        d = r.json()
        jwks = (await c.get("/events/jwks"))
        assert jwks.headers["cache-control"].startswith("public")
        jwks = jwks.json()
    # Derived from the configured public URL (so they work behind a proxy).
    assert d["stream_url"] == "wss://gw.example.com/base/ws/evt" and d["fallback_url"] == "wss://gw.example.com/base/ws"
    assert d["topics"] == ["activation", "queues"]
    header = jwt.get_unverified_header(d["token"])
    assert header["alg"] == "ES256" and header["kid"] == jwks["keys"][0]["kid"]
    key = jwt.PyJWK(jwks["keys"][0]).key
    claims = jwt.decode(d["token"], key, algorithms=["ES256"], audience="controlbus")
    assert claims["sub"] == "dev-user" and claims["world_id"] == "w1" and claims["strategy_id"] == "s-1"
    assert claims["topics"] == ["activation", "queues"] and claims["jti"] and claims["exp"] - claims["iat"] == 300
    exp = datetime.fromisoformat(d["expires_at"].replace("Z", "+00:00"))
    assert abs(exp.timestamp() - claims["exp"]) < 1


async def test_descriptor_refusals(make_gw):
    gw = await make_gw()
    async with httpx.AsyncClient(base_url=gw.url) as c:
        r = await c.post("/events/subscribe", json={"world_id": "w1", "topics": ["activation", "orders"]})
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
        r = await c.post("/events/subscribe", json={"topics": ["policy"]})
        assert r.status_code == 422 and "world_id" in r.json()["detail"]
        r = await c.post("/events/subscribe", json={"topics": ["queues"], "queue_keys": [{"tags": ["btc"], "interval": 60}]})
        assert r.status_code == 200  # a queue-only subscription needs neither world nor strategy
        r = await c.post("/events/subscribe", json={"topics": ["activation"], "queue_keys": [{"tags": ["a"], "interval": 1}], "world_id": "w1"})
        assert r.status_code == 422


def _es256_pair(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "caller-issuer.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, str(pub)


def _caller_token(key, sub, roles, ttl=300):
    now = int(time.time())
    return jwt.encode({"sub": sub, "world_roles": roles, "iat": now, "exp": now + ttl}, key, algorithm="ES256")


async def test_jwt_mode_read_access_legacy_route_and_callback_auth(make_gw, tmp_path, bus):
    key, pub = _es256_pair(tmp_path)
    gw = await make_gw(gateway={"auth": {"mode": "jwt", "public_keys": [pub]}, "service_token": "svc-secret"})
    alice = _caller_token(key, "alice", {"w1": ["reader"]})
    async with httpx.AsyncClient(base_url=gw.url) as c:
        r = await c.post("/events/subscribe", json={"world_id": "w1", "topics": ["activation"]})
        assert r.status_code == 401
        r = await c.post("/events/subscribe", json={"world_id": "w2", "topics": ["activation"]}, headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 403
        r = await c.post("/events/subscribe", json={"world_id": "w1", "topics": ["activation"]}, headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 200
        assert jwt.decode(r.json()["token"], options={"verify_signature": False})["sub"] == "alice"
        body = {"event": "sentinel_weight", "data": {"sentinel_id": "x", "weight": 0.5}}
        assert (await c.post("/callbacks/dag-event", json=body)).status_code == 401
        # a caller's valid JWT never reaches the callback (service-to-service only)
        r = await c.post("/callbacks/dag-event", json=body, headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
        r = await c.post("/callbacks/dag-event", json=body, headers={"X-QMTL-Service-Token": "svc-secret"})
        assert r.status_code == 202
    # Legacy /ws: no token → 1008; the caller's JWT → only the worlds it may read.
    ws = await connect(gw.ws_url + "/ws")
    assert await close_code(ws) == 1008
    ws = await connect(gw.ws_url + "/ws", alice)
    await bus.publish("control.activation", activation("w2", "s", 1), key="w2")
    await bus.publish("control.activation", activation("w1", "s", 2), key="w1")
    frame = _valid(await recv(ws))
    assert frame["type"] == "activation_updated" and frame["data"]["world_id"] == "w1"
    await expect_silence(ws)
    await ws.close()
    assert await gw.metric("ws_rejected_total", route="/ws", reason="missing_token") == 1


async def test_bad_tokens_are_closed_with_1008_and_counted(make_gw):
    gw = await make_gw()
    ring = gw.events.tokens.ring
    kid = ring.signer.kid
    now = int(time.time())
    claims = {"aud": "controlbus", "sub": "u", "world_id": "w1", "topics": ["activation"], "iat": now, "exp": now + 60}
    other = ec.generate_private_key(ec.SECP256R1())
    forged = {
        "bad_signature": jwt.encode(claims, other, algorithm="ES256", headers={"kid": kid}),
        "expired": ring.sign({**claims, "iat": now - 100, "exp": now - 50}),
        "bad_audience": ring.sign({**claims, "aud": "someone-else"}),
        "unknown_kid": jwt.encode(claims, other, algorithm="ES256", headers={"kid": "not-in-the-ring"}),
        "algorithm_not_allowed": jwt.encode(claims, "a-shared-secret-of-32-bytes-or-more!", algorithm="HS256", headers={"kid": kid}),
        "malformed": "not.a.jwt",
    }
    for reason, token in forged.items():
        ws = await connect(gw.ws_url + "/ws/evt", token)
        assert await close_code(ws) == 1008, reason
        assert await gw.metric("ws_rejected_total", route="/ws/evt", reason=reason) == 1, reason
    ws = await connect(gw.ws_url + "/ws/evt")  # no token at all
    assert await close_code(ws) == 1008
    # alg "none"
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    ws = await connect(f"{gw.ws_url}/ws/evt?token={unsigned}")
    assert await close_code(ws) == 1008
    # the token in the query string works as well as the header; a world outside it is refused
    good = ring.sign(claims)
    ws = await connect(f"{gw.ws_url}/ws/evt?token={good}")
    assert _valid(await recv(ws))["type"] == "snapshot"
    await ws.close()
    ws = await connect(f"{gw.ws_url}/ws/evt?token={good}&world_id=w2")
    assert await close_code(ws) == 1008
    assert await gw.metric("ws_dropped_subscribers_total", route="/ws/evt") == 0


async def test_key_rotation_old_tokens_verify_until_expiry(make_gw, tmp_path):
    path = tmp_path / "k.pem"
    first = SigningKey.generate("ES256")
    path.write_bytes(first.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    gw = await make_gw(events={"signing_keys": [str(path)]})
    d1 = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
    second = SigningKey.generate("ES256")
    path.write_bytes(second.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert gw.events.tokens.reload() is True
    d2 = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
    assert jwt.get_unverified_header(d1["token"])["kid"] == first.kid
    assert jwt.get_unverified_header(d2["token"])["kid"] == second.kid
    async with httpx.AsyncClient(base_url=gw.url) as c:
        kids = [k["kid"] for k in (await c.get("/events/jwks")).json()["keys"]]
    assert kids == [second.kid, first.kid]
    for d in (d1, d2):
        ws = await connect(d["stream_url"], d["token"])
        assert (await recv(ws))["type"] == "snapshot"
        await ws.close()
    # Past the old key's last token, it no longer verifies.
    ring = gw.events.tokens.ring
    ring._clock = lambda: time.time() + 301
    ws = await connect(d1["stream_url"], d1["token"])
    assert await close_code(ws) == 1008


# -- slow clients, heartbeats ------------------------------------------------------------------
async def test_stalled_client_is_dropped_with_4008_and_others_get_everything(make_gw, bus):
    gw = await make_gw(events={"client_queue_size": 128})
    d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
    fast = await connect(d["stream_url"], d["token"])
    await recv(fast)
    slow = await StalledClient.open(gw.port, "/ws/evt", d["token"])
    big = "x" * 2000
    n = 2000
    received: list[dict] = []

    async def drain():
        while len(received) < n:
            received.append(await recv(fast, 20))

    drainer = asyncio.create_task(drain())
    for i in range(n):
        await bus.publish("control.activation", activation("w1", f"s{i % 5}-{big}", i + 1), key="w1")
        if i % 20 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(drainer, 30)
    assert [f["data"]["etag"] for f in received] == [activation("w1", f"s{i % 5}-{big}", i + 1)["etag"] for i in range(n)]
    assert await gw.metric("ws_dropped_subscribers_total", route="/ws/evt") == 1
    assert await slow.read_close_code(15) == 4008  # after what it had buffered, the documented code
    slow.close()
    await fast.close()
    await asyncio.sleep(0.1)
    assert await gw.metric("ws_dropped_subscribers_total", route="/ws/evt") == 1  # a normal close is not a drop
    assert await gw.metric("ws_subscribers", route="/ws/evt") == 0


async def test_a_client_that_never_reads_is_cut_off_after_the_close_grace(make_gw, bus):
    """Dropped (4008) but its close frame cannot be sent either: after the close grace the
    Gateway resets the connection instead of keeping its socket and send buffer."""
    gw = await make_gw(events={"client_queue_size": 64})
    gw.events.close_grace = 0.3
    d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
    slow = await StalledClient.open(gw.port, "/ws/evt", d["token"])
    big = "x" * 2000
    for i in range(1500):
        await bus.publish("control.activation", activation("w1", f"s{i % 5}-{big}", i + 1), key="w1")
        if i % 20 == 0:
            await asyncio.sleep(0)
    deadline = time.monotonic() + 20
    while await gw.metric("ws_aborted_connections_total", route="/ws/evt") < 1:
        assert time.monotonic() < deadline, "the stalled connection was never cut off"
        await asyncio.sleep(0.1)
    assert await gw.metric("ws_dropped_subscribers_total", route="/ws/evt") == 1
    assert await gw.metric("ws_subscribers", route="/ws/evt") == 0
    try:  # what it had buffered, then the end: reset, or EOF without a close frame
        code = await slow.read_close_code(15)
    except ConnectionResetError:
        code = None
    assert code is None
    slow.close()


async def test_heartbeats(make_gw):
    gw = await make_gw(events={"heartbeat_interval": 0.2})
    d = await gw.descriptor({"topics": ["queues"]})
    ws = await connect(d["stream_url"], d["token"])
    first = _valid(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert first["type"] == "snapshot" and first["data"] == {"topic": "queues", "state_hash": first["data"]["state_hash"], "items": []}
    hb = _valid(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert hb["type"] == "heartbeat" and "ts" in hb["data"]
    await ws.close()


# -- callback, sentinel traffic, local relays --------------------------------------------------
async def test_dag_event_callback_legacy_and_envelopes(make_gw):
    gw = await make_gw()
    d = await gw.descriptor({"world_id": "w1", "topics": ["activation", "queues"], "queue_keys": [{"tags": ["btc"], "interval": 60}]})
    # the key is unknown to the Gateway: make the DAG Manager lookup answer it
    _fake_dagmanager(gw, {("btc", 60, "any"): ["q0"]})
    ws = await connect(d["stream_url"], d["token"])
    snaps = await recv_n(ws, 2)
    assert snaps[1]["data"]["items"][0]["queues"] == ["q0"]
    changed_at = (datetime.now(UTC) - timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    async with httpx.AsyncClient(base_url=gw.url, headers=gw.service_headers) as c:
        r = await c.post("/callbacks/dag-event", json={"event": "queue_update",
                                                       "data": {"tags": ["btc"], "interval": 60, "queues": ["q0", "q1"], "match_mode": "any"}})
        assert r.json() == {"accepted": True, "duplicate": False}
        r = await c.post("/callbacks/dag-event", json={"event": "queue_update", "data": {"tags": ["btc"], "interval": 60, "queues": ["q1", "q0"]}})
        assert r.json() == {"accepted": True, "duplicate": True}  # same set
        r = await c.post("/callbacks/dag-event", json={"event": "sentinel_weight", "data": {"version": "v2", "weight": 0.25, "ts": changed_at}})
        assert r.status_code == 202
        r = await c.post("/callbacks/dag-event", json=queues_event(["btc"], 60, ["q1"], 10_000))
        assert r.status_code == 202 and r.json()["duplicate"] is False
        r = await c.post("/callbacks/dag-event", json={"event": "sentinel_weight", "data": {"sentinel_id": "x", "weight": 2}})
        assert r.status_code == 422
        r = await c.post("/callbacks/dag-event", json={"type": "ActivationUpdated", "version": 1})
        assert r.status_code == 422
    frames = [_valid(f) for f in await recv_n(ws, 3)]
    assert [f["type"] for f in frames] == ["queue_update", "sentinel_weight", "queue_update"]
    assert frames[0]["data"]["queues"] == ["q0", "q1"] and frames[2]["data"]["queues"] == ["q1"]
    assert frames[1]["data"]["sentinel_id"] == "v2" and frames[1]["data"]["weight"] == 0.25
    assert await gw.metric("gateway_sentinel_traffic_ratio", sentinel_id="v2") == 0.25
    assert await gw.metric("sentinel_skew_seconds_count") == 1
    assert 2.0 <= await gw.metric("sentinel_skew_seconds_sum") < 10.0
    await ws.close()


async def test_relay_local_progress_reaches_the_strategy_and_legacy(make_gw):
    gw = await make_gw()
    mine = await gw.descriptor({"topics": ["queues"], "strategy_id": "s-1"})
    other = await gw.descriptor({"topics": ["queues"], "strategy_id": "s-2"})
    ws_mine = await connect(mine["stream_url"], mine["token"])
    ws_other = await connect(other["stream_url"], other["token"])
    legacy = await connect(gw.ws_url + "/ws")
    await recv(ws_mine), await recv(ws_other)
    while len(gw.events.hub.subscribers) < 3:
        await asyncio.sleep(0.01)
    n = await gw.events.relay_local("progress", {"strategy_id": "s-1", "status": "processing"}, key="s-1")
    await gw.events.relay_local("queue_map", {"strategy_id": "s-1", "queue_map": {"n1": ["q"]}}, key="s-1")
    assert n == 2
    for ws in (ws_mine, legacy):
        got = [_valid(f) for f in await recv_n(ws, 2)]
        assert [f["type"] for f in got] == ["progress", "queue_map"] and got[0]["data"]["status"] == "processing"
    await expect_silence(ws_other)
    with pytest.raises(ValueError):
        await gw.events.relay_local("progress", {"strategy_id": "s-1", "status": "bogus"}, key="s-1")
    with pytest.raises(ValueError):
        await gw.events.relay_local("orders", {}, key="x")
    for ws in (ws_mine, ws_other, legacy):
        await ws.close()


def _fake_dagmanager(gw, sets, *, down=False):
    def handler(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("connection refused", request=request)
        q = request.url.params
        key = (q["tags"], int(q["interval"]), q.get("match_mode", "any"))
        queues = sets.get(key, [])
        return httpx.Response(200, json={"queues": queues, "etag": f"dm-{len(queues)}", "tags": q["tags"].split(","),
                                         "interval": int(q["interval"]), "match_mode": key[2]})

    gw.service.dagmanager.client = httpx.AsyncClient(base_url="http://dagmanager", transport=httpx.MockTransport(handler))


async def test_queue_keys_from_query_resolved_at_dagmanager_or_1013(make_gw, bus):
    gw = await make_gw()
    _fake_dagmanager(gw, {("btc", 60, "all"): ["a", "b"]})
    d = await gw.descriptor({"topics": ["queues"]})
    ws = await connect(f"{d['stream_url']}?tags=btc&interval=60&match_mode=all", d["token"])
    snap = _valid(await recv(ws))
    assert snap["data"]["items"][0]["queues"] == ["a", "b"] and snap["data"]["items"][0]["match_mode"] == "all"
    # the other mode of the same (tags, interval) is another key: not delivered
    await bus.publish("control.queues", queues_event(["btc"], 60, ["z"], 1, match_mode="any"), key="k")
    await bus.publish("control.queues", queues_event(["btc"], 60, ["a"], 2, match_mode="all"), key="k")
    f = _valid(await recv(ws))
    assert f["data"]["queues"] == ["a"] and f["data"]["match_mode"] == "all"
    await expect_silence(ws)
    await ws.close()
    _fake_dagmanager(gw, {}, down=True)
    ws = await connect(f"{d['stream_url']}?tags=eth&interval=60", d["token"])
    assert await close_code(ws) == 1013
    ws = await connect(f"{d['stream_url']}?tags=&interval=x", d["token"])
    assert await close_code(ws) == 1008
    async with httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/queues/state_hash", params={"tags": "eth", "interval": 60})).status_code == 503
        r = await c.get("/queues/state_hash", params={"tags": "btc", "interval": 60, "match_mode": "all"})
        assert r.status_code == 200 and r.json()["state_hash"] == f["statehash"]


async def test_snapshot_waits_for_the_state_rebuild(make_gw, bus):
    gw = await make_gw(events={"ready_timeout": 0.3})
    d = await gw.descriptor({"world_id": "w1", "topics": ["activation"]})
    gw.events.consumer.ready.clear()  # as during a rebuild after a restart
    ws = await connect(d["stream_url"], d["token"])
    assert await close_code(ws) == 1013
    gw.events.consumer.ready.set()
    ws = await connect(d["stream_url"], d["token"])
    assert (await recv(ws))["type"] == "snapshot"
    await ws.close()
