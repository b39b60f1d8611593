"""Attacks of issue 15 (items 1, 8, 9) as an outsider sends them, against a
production-configured ``qmtl up`` in its own process (:mod:`tests.security.secauth_stack`):
forged activation state through ``/callbacks/dag-event``, a 2099 ``ts``, legacy bodies with a
caller's token, label cardinality, 100-year tokens, bodies read before authentication,
control-character tags."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import UTC, datetime

import pytest

from qmtl.sdk import ActivationGate, EventStream, GatewayClient
from tests.sdk.live import wait_until
from tests.sdk.test_stream_live import Collector
from tests.security.secauth_stack import LABEL_CAP, stack  # noqa: F401 - the module's stack fixture

OWNER_ALL = {"*": ["owner"]}
# The literal forged body of issue 15 item 1 (the victim's world id filled in).
FORGED = ('{"type":"ActivationUpdated","version":1,"world_id":"%s","strategy_id":"evil","side":"long","active":true,'
          '"weight":1,"etag":"x1","run_id":"f","ts":"2099-01-01T00:00:00Z"}')
JSON = {"content-type": "application/json"}


def problem(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["detail"]
    return body


def world() -> str:
    return "victim-" + uuid.uuid4().hex[:10]


async def test_forged_activation_is_refused_and_the_victim_sees_nothing(stack):
    w = world()
    owner = stack.idp.token("victim-owner", world_roles=OWNER_ALL)
    async with GatewayClient(stack.url, token=owner, backoff_base=0.05) as gw:
        await gw.create_world(w, "victim")
        await gw.apply(w, {"activate": [{"strategy_id": "good", "side": "long", "weight": 0.5}]}, consent_live=True)
        got = Collector()
        async with EventStream(gw, world_id=w, topics=["activation"], on_event=got) as stream:
            gate = ActivationGate(gw, stream=stream)
            await stream.wait_synced(10)
            await wait_until(lambda: gate.is_active(w, "good", "long"), 10, what="the genuine activation")

            async with stack.client() as c:
                # a valid JWT with no roles at all — the attack of issue 15
                problem(await c.post("/callbacks/dag-event", content=FORGED % w, headers={**JSON, **stack.bearer("mallory")}), 403)
                # even the world's owner: callbacks are service-to-service only
                problem(await c.post("/callbacks/dag-event", content=FORGED % w, headers={**JSON, **stack.bearer("victim-owner", OWNER_ALL)}), 403)
                # no credential, a wrong service token, and a caller JWT presented as the service token
                problem(await c.post("/callbacks/dag-event", content=FORGED % w, headers=JSON), 401)
                problem(await c.post("/callbacks/dag-event", content=FORGED % w, headers={**JSON, "X-QMTL-Service-Token": "guess"}), 401)
                jwt_as_token = stack.bearer("mallory")["Authorization"].split()[1]
                problem(await c.post("/callbacks/dag-event", content=FORGED % w, headers={**JSON, "X-QMTL-Service-Token": jwt_as_token}), 401)

            # a genuine change after the attack goes through and is seen
            await gw.apply(w, {"activate": [{"strategy_id": "good", "side": "long", "weight": 0.75}]}, consent_live=True)
            await wait_until(lambda: any(e.data.get("weight") == 0.75 for e in got.of("activation_updated", "stream")), 10,
                             what="the genuine update after the attack")
            assert not any(e.data.get("strategy_id") == "evil" for e in got.events if e.type == "activation_updated")
            assert gate.is_active(w, "evil", "long") is False
            assert stream.stats.hash_mismatches == 0

        # a new subscriber's snapshot holds no forged entry either
        fresh = Collector()
        async with EventStream(gw, world_id=w, topics=["activation"], on_event=fresh) as again:
            await again.wait_synced(10)
            items = fresh.of("snapshot")[0].data["items"]
            assert {i["strategy_id"] for i in items} == {"good"} and items[0]["weight"] == 0.75
        assert (await gw.get_activation(w, "evil", "long"))["active"] is False


async def test_a_service_credential_with_a_2099_ts_is_refused_naming_the_field(stack):
    w = world()
    owner = stack.idp.token("ts-owner", world_roles=OWNER_ALL)
    async with GatewayClient(stack.url, token=owner, backoff_base=0.05) as gw:
        await gw.create_world(w, "ts")
        got = Collector()
        async with EventStream(gw, world_id=w, topics=["activation"], on_event=got) as stream:
            gate = ActivationGate(gw, stream=stream)
            await stream.wait_synced(10)
            async with stack.client() as c:
                body = problem(await c.post("/callbacks/dag-event", content=FORGED % w, headers={**JSON, **stack.service_headers}), 422)
                assert body["errors"][0]["pointer"] == "/ts" and "future" in body["detail"]
                legacy = {"event": "sentinel_weight", "data": {"sentinel_id": "s-2099", "weight": 1, "ts": "2099-01-01T00:00:00Z"}}
                body = problem(await c.post("/callbacks/dag-event", json=legacy, headers=stack.service_headers), 422)
                assert body["errors"][0]["pointer"] == "/data/ts"
                # the service credential with a plausible ts is relayed (the credential works)
                now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
                ok = (FORGED % w).replace("2099-01-01T00:00:00Z", now).replace('"evil"', '"svc"')
                r = await c.post("/callbacks/dag-event", content=ok, headers={**JSON, **stack.service_headers})
                assert r.status_code == 202 and r.json() == {"accepted": True, "duplicate": False}
            assert not any(e.data.get("ts", "").startswith("2099") for e in got.of("activation_updated"))
            # genuine later updates are never "older" than anything held
            await gw.apply(w, {"activate": [{"strategy_id": "svc", "side": "long", "weight": 0.25}],
                               "deactivate": []}, consent_live=True)
            await wait_until(lambda: (gate.entry(w, "svc", "long") or {}).get("weight") == 0.25, 10,
                             what="WorldService's later update to the same entry")


@pytest.mark.parametrize("body", [
    {"event": "queue_update", "data": {"tags": ["btc"], "interval": 60, "queues": ["evil_queue"], "match_mode": "any"}},
    {"event": "sentinel_weight", "data": {"sentinel_id": "s-1-sentinel", "weight": 1}},
    {"specversion": "1.0", "id": "f0", "source": "qmtl.dagmanager", "type": "sentinel_weight", "time": "2025-08-28T09:00:05Z",
     "datacontenttype": "application/json", "data": {"sentinel_id": "s-1-sentinel", "weight": 1}},
], ids=["legacy-queue_update", "legacy-sentinel_weight", "cloudevents-sentinel_weight"])
async def test_legacy_bodies_with_a_caller_jwt_are_refused(stack, body):
    async with stack.client() as c:
        problem(await c.post("/callbacks/dag-event", json=body, headers=stack.bearer("mallory")), 403)
        problem(await c.post("/callbacks/dag-event", json=body, headers=stack.bearer("ops", OWNER_ALL)), 403)
        problem(await c.post("/callbacks/dag-event", json=body), 401)
        metrics = (await c.get("/metrics")).text
    assert 'sentinel_id="s-1-sentinel"' not in metrics


async def test_sentinel_ids_from_callers_make_a_bounded_number_of_series(stack):
    n = LABEL_CAP * 5  # 200 distinct ids against a cap of 40
    async with stack.client() as c:
        for i in range(n):
            r = await c.post("/callbacks/dag-event", json={"event": "sentinel_weight", "data": {"sentinel_id": f"flood-{i}", "weight": 0.5}},
                             headers=stack.service_headers)
            assert r.status_code == 202
        text = (await c.get("/metrics")).text
    series = re.findall(r'^gateway_sentinel_traffic_ratio\{sentinel_id="([^"]*)"\}', text, re.M)
    assert 'other' in series and len(series) <= LABEL_CAP + 1, len(series)
    assert len([s for s in series if s.startswith("flood-")]) <= LABEL_CAP


async def test_a_100_year_token_is_refused(stack):
    century = 100 * 365 * 86400
    async with stack.client() as c:
        r = await c.get("/worlds", headers=stack.bearer("old-timer", OWNER_ALL, ttl=century))
        assert "lifetime" in problem(r, 401)["detail"]
        r = await c.get("/worlds", headers=stack.bearer("no-iat", OWNER_ALL, ttl=century, iat=None))  # exp - now
        assert "lifetime" in problem(r, 401)["detail"]
        assert (await c.get("/worlds", headers=stack.bearer("normal", OWNER_ALL, ttl=3600))).status_code == 200


@pytest.mark.parametrize("path", ["/strategies", "/worlds", "/events/subscribe"])
async def test_anonymous_requests_get_401_before_their_body_is_read(stack, path):
    async with stack.client() as c:
        for body in (b'{"not": "valid"}', b"{broken json", b"[" * 10_000):
            r = await c.post(path, content=body, headers=JSON)
            assert "bearer token is required" in problem(r, 401)["detail"]
            assert r.headers["www-authenticate"].startswith("Bearer")


async def test_control_character_tags_are_a_400_and_never_open_the_breaker(stack):
    headers = stack.bearer("reader", OWNER_ALL)
    async with stack.client() as c:
        for path in ("/queues/by_tag", "/queues/state_hash"):
            for _ in range(8):  # more than the breaker's failure threshold (5)
                r = await c.get(f"{path}?tags=%C2%94%2C%04%2C%00%19%C3%BE&interval=60", headers=headers)
                problem(r, 400)
        status = (await c.get("/status")).json()
        assert status["breakers"]["dagmanager"]["state"] == "closed", status
        # the DAG Manager still answers real lookups through the Gateway
        r = await c.get("/queues/by_tag?tags=btc&interval=60", headers=headers)
        assert r.status_code == 200 and r.json()["queues"] == []


async def test_an_open_stream_is_closed_when_its_token_expires_unless_refreshed(stack):
    import jwt
    import websockets

    from qmtl.gateway.events.ws import EXPIRY_GRACE

    owner = stack.idp.token("stream-owner", world_roles=OWNER_ALL)
    async with stack.client(headers={"Authorization": f"Bearer {owner}"}) as c:
        w = world()
        assert (await c.post("/worlds", json={"world_id": w, "name": "expiry"})).status_code == 201

        async def descriptor(world_id: str = w) -> dict:
            r = await c.post("/events/subscribe", json={"world_id": world_id, "topics": ["activation"]})
            assert r.status_code == 200, r.text
            return r.json()

        def exp(token: str) -> float:
            return jwt.decode(token, options={"verify_signature": False})["exp"]

        # without a refresh: closed with 1008 once the token's exp (+ the verification leeway) passes
        desc = await descriptor()
        async with websockets.connect(desc["stream_url"], additional_headers={"Authorization": f"Bearer {desc['token']}"}) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            assert closed.value.rcvd.code == 1008 and "token expired" in closed.value.rcvd.reason
            assert time.time() >= exp(desc["token"])

        # refreshed on the open stream with a later token of the caller: it outlives the first token
        desc = await descriptor()
        async with websockets.connect(desc["stream_url"], additional_headers={"Authorization": f"Bearer {desc['token']}"}) as ws:
            await asyncio.sleep(1.5)
            other = await descriptor(world())  # another world's token: refused, changes nothing
            renew = await descriptor()
            assert exp(renew["token"]) > exp(desc["token"])
            await ws.send(json.dumps({"type": "refresh", "token": other["token"]}))
            await ws.send(json.dumps({"type": "refresh", "token": renew["token"]}))
            outlived = 0
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 15)
                    if '"heartbeat"' in frame and time.time() > exp(desc["token"]) + EXPIRY_GRACE + 0.2:
                        outlived += 1
            assert outlived > 0  # frames after the first token's end
            assert closed.value.rcvd.code == 1008 and time.time() >= exp(renew["token"])  # and it ended with the renewed one


async def test_the_sdk_stream_refreshes_in_band_and_stays_connected(stack):
    owner = stack.idp.token("sdk-owner", world_roles=OWNER_ALL)
    async with GatewayClient(stack.url, token=owner, backoff_base=0.05) as gw:
        w = world()
        await gw.create_world(w, "sdk refresh")
        async with EventStream(gw, world_id=w, topics=["activation"]) as stream:
            await stream.wait_synced(10)
            await wait_until(lambda: stream.stats.token_refreshes >= 3, 20, what="three token refreshes (TTL 3 s)")
            assert stream.stats.connects == 1, stream.stats  # never closed for expiry
            await gw.apply(w, {"activate": [{"strategy_id": "s", "side": "long", "weight": 1}]}, consent_live=True)
            await wait_until(lambda: stream.state.activation_entry(w, "s", "long") is not None, 10, what="a change on the stream")


async def test_dag_manager_writes_through_the_gateway_carry_the_service_token(stack):
    """A submission makes the Gateway call the DAG Manager's POST /diff, which now needs the
    service token: the submission completes."""
    from qmtl.sdk import Dag, Node

    owner = stack.idp.token("submitter", world_roles=OWNER_ALL)
    async with GatewayClient(stack.url, token=owner, backoff_base=0.05) as gw:
        ack = await gw.submit_strategy(Dag([Node("Compute", code=f"secauth {uuid.uuid4().hex}")]), run_type="backtest")
        assert (await gw.wait_for_status(ack["strategy_id"], timeout=20))["status"] == "completed"

