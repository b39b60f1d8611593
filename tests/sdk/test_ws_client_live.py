"""``qmtl.sdk.ws_client.WebSocketClient`` (the existing client's API) against a live
Gateway's legacy ``/ws``."""

from __future__ import annotations

import asyncio

import httpx

from qmtl.sdk import GatewayClient
from qmtl.sdk.ws_client import WebSocketClient
from tests.sdk.conftest import LIVE_SERVICE_TOKEN
from tests.sdk.live import wait_until


async def callback(url: str, body: dict) -> None:
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/callbacks/dag-event", json=body, headers={"X-QMTL-Service-Token": LIVE_SERVICE_TOKEN})
        assert r.status_code == 202, r.text


async def test_default_path_frames_and_tracked_state(live):
    received: list[dict] = []

    async def on_message(data: dict) -> None:
        received.append(data)

    client = WebSocketClient(live.url, on_message=on_message)  # http://host:port → ws://host:port/ws
    assert client.url == live.url.replace("http://", "ws://") + "/ws"
    await client.start()
    try:
        await wait_until(lambda: client.connects == 1, 5, what="a connection")
        sid = live.world_id("sentinel")
        tag = live.world_id("wsq")
        await asyncio.sleep(0.2)
        await callback(live.url, {"event": "sentinel_weight", "data": {"sentinel_id": sid, "weight": 0.4}})
        await callback(live.url, {"event": "queue_update", "data": {"tags": [tag, "b"], "interval": 60, "queues": ["q1", "q2"]}})
        await wait_until(lambda: client.sentinel_weights.get(sid) == 0.4, 5, what="the sentinel weight")
        await wait_until(lambda: client.queue_topics.get(f"b,{tag}|60|any") == ["q1", "q2"], 5, what="the queue update")
        frames = [m for m in received if m.get("type") in ("sentinel_weight", "queue_update")]
        assert all(m["specversion"] == "1.0" and isinstance(m["data"], dict) for m in frames)
    finally:
        await client.stop()
    assert client._task is None


async def test_token_header_and_reconnect_with_resume(proxies):
    live = proxies
    async with GatewayClient(live.url) as gw:
        desc = await gw.subscribe(["activation"], world_id=(await gw.create_world(live.world_id(), "ws"))["world_id"])
    received: list[dict] = []

    async def on_message(data: dict) -> None:
        received.append(data)

    # through the fallback proxy to /ws, with a descriptor token (accepted by /ws)
    client = WebSocketClient(f"ws://127.0.0.1:{live.fallback_proxy.port}", on_message=on_message, token=desc["token"],
                             max_retries=20, base_delay=0.1, max_delay=0.3)
    await client.start()
    try:
        sid = live.world_id("s")
        await wait_until(lambda: client.connects == 1, 5, what="a connection")
        await asyncio.sleep(0.2)
        await callback(live.url, {"event": "sentinel_weight", "data": {"sentinel_id": sid, "weight": 0.1}})
        await wait_until(lambda: client.sentinel_weights.get(sid) == 0.1, 5, what="the first weight")
        live.fallback_proxy.close()
        await callback(live.url, {"event": "sentinel_weight", "data": {"sentinel_id": sid, "weight": 0.9}})
        await asyncio.sleep(0.5)
        live.fallback_proxy.open()
        # (the descriptor token, 3 s TTL + 2 s allowed skew, is still valid for this reconnect)
        await wait_until(lambda: client.sentinel_weights.get(sid) == 0.9, 10, what="the weight missed while away")
        assert client.connects >= 2
        weights = [m["data"]["weight"] for m in received if m.get("type") == "sentinel_weight" and m["data"]["sentinel_id"] == sid]
        assert weights == [0.1, 0.9]  # replayed once, in order
    finally:
        await client.stop()


async def test_gives_up_after_max_retries(live):
    client = WebSocketClient(live.url, token="not-a-token", max_retries=2, base_delay=0.05, max_delay=0.1)
    await client.start()
    await asyncio.wait_for(asyncio.shield(client._task), 10)  # ends by itself: every attempt refused (1008)
    assert client.connects == 3 and client.sentinel_weights == {}
    await client.stop()
