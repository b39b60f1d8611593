"""Shared pieces of the Gateway event-stream tests (imported by test_gateway_events*.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import websockets

from qmtl.bus import InProcessBus
from qmtl.common.config import load_config
from qmtl.contracts.events import event_validators
from tests.helpers.events import activation_updated, policy_updated, queue_updated
from tests.helpers.server import free_port, serve

T0 = datetime.now(UTC) + timedelta(hours=1)  # newer than anything the Gateway stamps with its own clock
_counter = itertools.count(1)


def ts(i: float) -> str:
    return (T0 + timedelta(milliseconds=i)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def activation(world: str, sid: str, i: int, *, side: str = "long", etag: str | None = None, **fields: Any) -> dict:
    """Activation ``i``: stamped ``ts(i)``, run ``r<i>``; ``fields`` as for ``activation_updated``."""
    return activation_updated(world, sid, side=side, etag=etag or f"{world}-{sid}-{side}-{i}", run_id=f"r{i}", ts=ts(i),
                              **fields)


def policy(world: str, version: int, status: str, i: int) -> dict:
    return policy_updated(world, version, status=status, ts=ts(i))


def queues_event(tags: list[str], interval: int, queues: list[str], i: int, match_mode: str | None = None) -> dict:
    return queue_updated(tags, interval, queues, match_mode=match_mode, etag=f"q-{i}", ts=ts(i))


class BusFactory:
    """Builds the buses of one test: one shared InProcessBus, or one KafkaBus per
    participant (as separate processes would have) on a per-test topic prefix."""

    def __init__(self, kind: str, bootstrap: str | None = None) -> None:
        self.kind = kind
        self.bootstrap = bootstrap
        self.prefix = f"t{uuid.uuid4().hex[:10]}."
        self._shared: Any = None
        self._made: list[Any] = []

    def make(self) -> Any:
        if self.kind == "inproc":
            if self._shared is None:
                self._shared = InProcessBus(validator=event_validators())
            return self._shared
        from qmtl.bus.kafka import KafkaBus

        bus = KafkaBus(self.bootstrap, validator=event_validators(), topic_prefix=self.prefix, reconnect_backoff=(0.05, 0.5),
                       request_timeout_ms=3000, publish_timeout_ms=5000)
        self._made.append(bus)
        return bus

    async def close(self) -> None:
        for bus in self._made:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.close(), 10)
        if self._shared is not None:
            await self._shared.close()


PARTS: tuple[str, ...] = ("auth", "events")  # the parts a helper Gateway builds (test modules may widen it)


class Gateway:
    """A Gateway (auth + events parts, see :data:`PARTS`) served on a real socket."""

    def __init__(self, bus: Any, data_dir: str, *, instance_id: str | None = None, events: dict | None = None,
                 gateway: dict | None = None) -> None:
        self.bus = bus
        self.data_dir = data_dir
        self.instance_id = instance_id or f"gw-{next(_counter)}"
        self.events_cfg = {"heartbeat_interval": 0.0, **(events or {})}
        # callbacks are service-to-service: tests post them with this Gateway's service token
        # and accepts event times up to 2 h ahead, since ts() stamps events T0 = 1 h ahead
        self.gateway_cfg = {"service_token": f"svc-{secrets.token_hex(8)}", "callbacks": {"max_clock_skew": 7200.0},
                            **(gateway or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self._stack: contextlib.AsyncExitStack | None = None
        self.app: Any = None

    @property
    def service_headers(self) -> dict[str, str]:
        """What a control-plane service presents on ``/callbacks/dag-event``."""
        return {"X-QMTL-Service-Token": self.gateway_cfg["service_token"]}

    @property
    def service(self) -> Any:
        return self.app.service

    @property
    def events(self) -> Any:
        return self.app.service.events

    async def start(self) -> Gateway:
        from qmtl.gateway.app import create_app

        overrides = {
            "data_dir": self.data_dir,
            "gateway": {"public_url": self.url, **self.gateway_cfg,
                        "events": {"instance_id": self.instance_id, **self.events_cfg}},
        }
        cfg = load_config(environ={}, overrides=overrides)
        self.app = create_app(cfg, bus=self.bus, parts=PARTS)
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(serve(self.app, port=self.port))
        assert await self.events.wait_ready(20), "event state rebuild did not finish"
        return self

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def __aenter__(self) -> Gateway:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def descriptor(self, body: dict, headers: dict | None = None) -> dict:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            r = await c.post("/events/subscribe", json=body, headers=headers or {})
        assert r.status_code == 200, r.text
        return r.json()

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            text = (await c.get("/metrics")).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head == name and not want:
                return float(value)
            if head.startswith(name + "{"):
                got = ",".join(sorted(head[len(name) + 1:-1].split(",")))
                if got == want:
                    return float(value)
        return 0.0

    async def wait_applied(self, n_events: int, timeout: float = 15.0) -> None:
        """Until the live consumer has handled ``n_events`` messages in total."""
        deadline = time.monotonic() + timeout
        while self.events.consumer.stats["consumed"] < n_events:
            assert time.monotonic() < deadline, f"consumed {self.events.consumer.stats['consumed']} of {n_events}"
            await asyncio.sleep(0.02)


async def connect(url: str, token: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return await asyncio.wait_for(websockets.connect(url, additional_headers=headers, **kw), 10)


async def recv(ws: Any, timeout: float = 10.0, *, skip_heartbeats: bool = True) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if skip_heartbeats and frame["type"] == "heartbeat":
            continue
        return frame


async def recv_n(ws: Any, n: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < n:
        out.append(await recv(ws, max(0.01, deadline - time.monotonic())))
    return out


async def expect_silence(ws: Any, seconds: float = 0.3) -> None:
    try:
        frame = await recv(ws, seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame}")


async def close_code(ws: Any, timeout: float = 10.0) -> int | None:
    """Read until the server closes; the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code


@contextlib.asynccontextmanager
async def gateways(bus_factory: BusFactory, tmp_path: Any, n: int = 1, **kw: Any) -> AsyncIterator[list[Gateway]]:
    gws = [Gateway(bus_factory.make(), str(tmp_path / f"gw{i}"), **kw) for i in range(n)]
    try:
        for g in gws:
            await g.start()
        yield gws
    finally:
        for g in gws:
            await g.stop()


class StalledClient:
    """A WebSocket client that completes the handshake and then stops reading (a tiny
    receive buffer, no reads), until ``read_close_code`` drains it to the close frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path_and_query: str, token: str | None = None) -> StalledClient:
        import base64
        import os
        import socket

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write((f"GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status.startswith(b"HTTP/1.1 101"), status
        return cls(reader, writer)

    async def read_close_code(self, timeout: float = 30.0) -> int | None:
        """Read frames until the server's close frame; its code (None at EOF without one)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    head = await self.reader.readexactly(2)
                except asyncio.IncompleteReadError:
                    return None
                opcode, length = head[0] & 0x0F, head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(await self.reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await self.reader.readexactly(8), "big")
                payload = await self.reader.readexactly(length)
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None

    def close(self) -> None:
        self.writer.close()
