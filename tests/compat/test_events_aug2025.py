"""The event stream as the Aug-2025 clients used it (issue 12 items 4 and 5): the legacy
``WebSocketClient`` on ``/ws`` given a ``ws://`` URL, ``TagQueryManager`` from its old import
path with that era's constructor and callbacks, and ``/queues/watch`` seeing the same events
as ``/ws``. Against ``qmtl up``; bodies as literal bytes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest

from tests.compat.aug2025 import JSON, up, ws_url  # noqa: F401 - the module's qmtl up

pytestmark = pytest.mark.asyncio


async def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_the_legacy_client_from_its_old_path_on_a_bare_ws_url(up):
    from qmtl.sdk.ws_client import WebSocketClient  # the Aug-2025 import path

    seen: list[dict] = []

    async def on_message(data: dict) -> None:
        seen.append(data)

    # that era's keyword arguments
    client = WebSocketClient(ws_url(up), on_message=on_message, max_retries=None, max_total_time=30.0,
                             base_delay=1.0, backoff_factor=2.0, max_delay=8.0, token=None)
    assert client.url == ws_url(up) + "/ws"
    await client.start()
    try:
        await _eventually(lambda: client.connects == 1, "the connection")
        await asyncio.sleep(0.2)  # the server registers the subscriber after the handshake
        async with httpx.AsyncClient(base_url=up.url, timeout=10) as c:
            # the DAG Manager's legacy callback (the era's wire form)
            r = await c.post("/callbacks/dag-event", headers=JSON,
                             content=b'{"event": "sentinel_weight", "data": {"sentinel_id": "aug25-sentinel", "weight": 0.25}}')
            assert r.status_code == 202, r.text
        await _eventually(lambda: client.sentinel_weights.get("aug25-sentinel") == 0.25, "sentinel_weights")
        frame = next(f for f in seen if f.get("type") == "sentinel_weight")
        assert frame["specversion"] == "1.0" and frame["data"] == {"sentinel_id": "aug25-sentinel", "weight": 0.25}
    finally:
        await client.stop()


class EraNode:
    """A TagQueryNode as that era's SDK had it: query_tags, interval, an enum match_mode, update_queues."""

    class Mode:
        def __init__(self, value: str) -> None:
            self.value = value

    def __init__(self, tags: list[str], interval: int, mode: str = "any") -> None:
        self.query_tags = tags
        self.interval = interval
        self.match_mode = EraNode.Mode(mode)
        self.updates: list[list[str]] = []

    def update_queues(self, queues: list[str]) -> None:
        self.updates.append(list(queues))


async def test_tag_query_manager_from_the_old_path_with_that_eras_arguments(up):
    from qmtl.sdk.tagquery_manager import TagQueryManager  # failed to import before
    from qmtl.sdk.ws_client import WebSocketClient

    node = EraNode(["aug25-tqm"], 60)
    ws = WebSocketClient(ws_url(up))
    manager = TagQueryManager(up.url, ws_client=ws, world_id=None, strategy_id=None)
    assert ws.on_message == manager.handle_message  # the manager takes the client's callback
    manager.register(node)
    await manager.resolve_tags(offline=True)
    assert node.updates == [[]]
    await manager.start()
    try:
        assert node.updates[-1] == []  # resolved over HTTP: nothing carries the tag yet
        await _eventually(lambda: ws.connects == 1, "the connection")
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=up.url, timeout=10) as c:
            r = await c.post("/callbacks/dag-event", headers=JSON, content=(
                b'{"event": "queue_update", "data": {"tags": ["aug25-tqm"], "interval": 60, '
                b'"queues": ["aug25-q1", "aug25-q2"], "match_mode": "any"}}'))
            assert r.status_code == 202, r.text
        await _eventually(lambda: node.updates[-1] == ["aug25-q1", "aug25-q2"], "the queue update on the node")
        manager.unregister(node)
        assert manager.nodes == {}
    finally:
        await manager.stop()


async def test_queues_watch_and_ws_see_the_same_event(up):
    """A queue_update reaching the Gateway's relay (here the DAG Manager's legacy callback,
    with a queue set the DAG Manager itself does not hold) shows on /ws and on /queues/watch."""
    import websockets

    params = {"tags": "aug25-watch", "interval": 60}
    async with httpx.AsyncClient(base_url=up.url, timeout=30) as c, \
            websockets.connect(ws_url(up) + "/ws") as ws, \
            c.stream("GET", "/queues/watch", params=params) as watch:
        assert watch.status_code == 200 and watch.headers["deprecation"]
        lines = watch.aiter_lines()
        first = json.loads(await asyncio.wait_for(lines.__anext__(), 10))
        assert first["queues"] == []
        await asyncio.sleep(0.2)
        r = await c.post("/callbacks/dag-event", headers=JSON, content=(
            b'{"event": "queue_update", "data": {"tags": ["aug25-watch"], "interval": 60, '
            b'"queues": ["aug25-w1"], "match_mode": "any"}}'))
        assert r.status_code == 202, r.text
        on_watch = json.loads(await asyncio.wait_for(lines.__anext__(), 10))
        assert on_watch["queues"] == ["aug25-w1"]
        # The DAG Manager never held that set: the reconcile (its periodic lookup) brings the
        # relay back to what it holds, which both show again.
        back = json.loads(await asyncio.wait_for(lines.__anext__(), 10))
        assert back["queues"] == []
        # /ws saw the same sets in the same order: the relay learning the key from the watch's
        # first lookup, the event, the reconcile.
        on_ws: list[list[str]] = []
        async with asyncio.timeout(10):
            while len(on_ws) < 3:
                frame = json.loads(await ws.recv())
                if frame["type"] == "queue_update" and frame["data"]["tags"] == ["aug25-watch"]:
                    on_ws.append(frame["data"]["queues"])
        assert on_ws == [first["queues"], on_watch["queues"], back["queues"]]


BUS_DAG = (
    '{"nodes": [{"node_id": "8b0b350c328cec49b85f16830e67c1b15203ebcaabec9eee22e7f8ca265469a8", '
    '"node_type": "StreamInput", "code_hash": "aug25-bus-code", "config_hash": "aug25-bus-cfg", '
    '"schema_hash": "aug25-bus-schema", "interval": 60, "period": 5, "tags": ["aug25-bus"], "inputs": []}]}'
)  # node id: SHA-256 of "StreamInput:aug25-bus-code:aug25-bus-cfg:aug25-bus-schema"; its CRC32: 2935708244


async def test_a_queue_updated_from_the_controlbus_reaches_watch_and_ws(up):
    """A strategy creates a queue with the watched tag: the DAG Manager publishes QueueUpdated on
    the ControlBus, and both streams show the new set."""
    import websockets

    from tests.compat.aug2025 import submission_bytes

    async with httpx.AsyncClient(base_url=up.url, timeout=30) as c, \
            websockets.connect(ws_url(up) + "/ws") as ws, \
            c.stream("GET", "/queues/watch", params={"tags": "aug25-bus", "interval": 60}) as watch:
        lines = watch.aiter_lines()
        assert json.loads(await asyncio.wait_for(lines.__anext__(), 10))["queues"] == []
        r = await c.post("/strategies", content=submission_bytes(BUS_DAG, 2935708244), headers=JSON)
        assert r.status_code == 202, r.text
        on_watch = json.loads(await asyncio.wait_for(lines.__anext__(), 15))
        assert len(on_watch["queues"]) == 1
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "queue_update" and frame["data"]["tags"] == ["aug25-bus"] and frame["data"]["queues"]:
                    break
        assert frame["data"]["queues"] == on_watch["queues"]
