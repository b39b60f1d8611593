"""Issue 12 item 2: an Aug-2025 DAG Manager POSTs its callbacks to ``/callbacks/dag-event``
as CloudEvents 1.0 structured JSON and sends no credential. An operator lets it in by its
source address (``gateway.callbacks.trusted_networks``); from anywhere else it is refused.

Against the production-configured ``qmtl up`` of :mod:`tests.security.secauth_stack`
(JWT mode; only ``127.0.0.2/32`` trusted): the bodies below are written from the contract,
byte for byte, and posted from 127.0.0.2 (trusted) and 127.0.0.1 (not trusted); what is
accepted must reach a legacy ``/ws`` subscriber."""

from __future__ import annotations

import asyncio
import json
import uuid

import websockets

from tests.security.secauth_stack import TRUSTED_SOURCE, UNTRUSTED_SOURCE, stack  # noqa: F401 - the module's stack fixture

HEADERS = {"content-type": "application/json"}


def queue_update(tag: str) -> bytes:
    return (
        '{"specversion": "1.0", "id": "%s", "source": "qmtl.dagmanager", "type": "queue_update", '
        '"time": "2025-08-28T09:00:00Z", "datacontenttype": "application/json", '
        '"data": {"tags": ["%s", "price"], "interval": 60, "queues": ["%s_price_ab12cd_v1"], "match_mode": "any"}}'
        % (uuid.uuid4(), tag, tag)
    ).encode()


def sentinel_weight(sentinel_id: str) -> bytes:
    return (
        '{"specversion": "1.0", "id": "%s", "source": "qmtl.dagmanager", "type": "sentinel_weight", '
        '"time": "2025-08-28T09:00:05Z", "datacontenttype": "application/json", '
        '"data": {"sentinel_id": "%s", "weight": 0.25}}' % (uuid.uuid4(), sentinel_id)
    ).encode()


async def frames_until(ws, want: set[str], timeout: float = 10.0) -> dict[str, dict]:
    got: dict[str, dict] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not want <= set(got):
        frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - loop.time())))
        if frame["type"] in want:
            got[frame["type"]] = frame
    return got


async def test_cloudevents_callbacks_from_a_trusted_network_are_relayed_to_ws(stack):
    tag = "ce" + uuid.uuid4().hex[:8]
    sid = f"{tag}-sentinel"
    reader = stack.bearer("ws-reader", {"*": ["reader"]})
    async with websockets.connect(stack.url.replace("http://", "ws://") + "/ws", additional_headers=reader) as ws:
        async with stack.client(TRUSTED_SOURCE) as c:
            r = await c.post("/callbacks/dag-event", content=queue_update(tag), headers=HEADERS)
            assert r.status_code == 202 and r.json() == {"accepted": True, "duplicate": False}, r.text
            r = await c.post("/callbacks/dag-event", content=sentinel_weight(sid), headers=HEADERS)
            assert r.status_code == 202 and r.json() == {"accepted": True, "duplicate": False}, r.text
        got = await frames_until(ws, {"queue_update", "sentinel_weight"})
    q = got["queue_update"]["data"]
    assert q["tags"] == sorted([tag, "price"]) and q["interval"] == 60 and q["queues"] == [f"{tag}_price_ab12cd_v1"]
    assert q["match_mode"] == "any"
    s = got["sentinel_weight"]["data"]
    assert s["sentinel_id"] == sid and s["weight"] == 0.25 and s["ts"] == "2025-08-28T09:00:05Z"  # the CloudEvent's time


async def test_the_same_bodies_from_an_untrusted_address_are_refused(stack):
    tag = "ce" + uuid.uuid4().hex[:8]
    async with stack.client(UNTRUSTED_SOURCE) as c:
        for body in (queue_update(tag), sentinel_weight(f"{tag}-sentinel")):
            r = await c.post("/callbacks/dag-event", content=body, headers=HEADERS)
            assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json"), r.text
            # claiming the trusted address in a forwarded header changes nothing
            for spoof in ({"X-Forwarded-For": TRUSTED_SOURCE}, {"Forwarded": f"for={TRUSTED_SOURCE}"}, {"X-Real-IP": TRUSTED_SOURCE}):
                r = await c.post("/callbacks/dag-event", content=body, headers={**HEADERS, **spoof})
                assert r.status_code == 401, (spoof, r.text)
            # nor does a caller's token
            r = await c.post("/callbacks/dag-event", content=body, headers={**HEADERS, **stack.bearer("ops", {"*": ["owner"]})})
            assert r.status_code == 403, r.text
        metrics = (await c.get("/metrics")).text
    assert f"{tag}-sentinel" not in metrics


async def test_trusted_network_callbacks_are_still_checked(stack):
    """Trust by address admits the caller, not any body: schema and plausibility still apply."""
    async with stack.client(TRUSTED_SOURCE) as c:
        future = sentinel_weight("s-future").replace(b"2025-08-28T09:00:05Z", b"2099-01-01T00:00:00Z")
        r = await c.post("/callbacks/dag-event", content=future, headers=HEADERS)
        assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/time", r.text
        bad = queue_update("x").replace(b'"interval": 60', b'"interval": "sixty"')
        r = await c.post("/callbacks/dag-event", content=bad, headers=HEADERS)
        assert r.status_code == 422, r.text
        # trusted networks admit only the callback route, not the caller API
        r = await c.get("/worlds")
        assert r.status_code == 401, r.text
