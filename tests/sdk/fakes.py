"""Fakes for EventStream tests without a Gateway: a sleep driven by a ManualClock, a
transport whose connections the test feeds and closes, and a Gateway client that hands out
descriptors and answers the reconcile routes from a dict."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jwt

from qmtl.common.clock import ManualClock
from qmtl.sdk.errors import TransportError
from qmtl.sdk.stream.transport import Closed, ConnectFailed

STREAM_URL = "ws://gw.test/events/stream"
FALLBACK_URL = "ws://gw.test/ws"


async def settle(turns: int = 50) -> None:
    """Let every task that can run without I/O or time run."""
    for _ in range(turns):
        await asyncio.sleep(0)


class ManualSleep:
    """``await sleep(s)`` ends when :meth:`advance` has moved the clock ``s`` seconds on."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []
        self.requested: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.clock.monotonic() + seconds, fut))
        await fut

    def _wake_due(self) -> None:
        now = self.clock.monotonic()
        for deadline, fut in self._waiters:
            if deadline <= now and not fut.done():
                fut.set_result(None)
        self._waiters = [(d, f) for d, f in self._waiters if not f.done()]

    async def advance(self, seconds: float) -> None:
        """Move time on by ``seconds``, waking each sleep at its deadline in order (what a
        woken task does before the next deadline happens before it)."""
        target = self.clock.monotonic() + seconds
        while True:
            await settle()
            pending = [d for d, f in self._waiters if not f.done()]
            nxt = min(pending, default=None)
            if nxt is None or nxt > target:
                break
            self.clock.advance(max(0.0, nxt - self.clock.monotonic()))
            self._wake_due()
        self.clock.advance(max(0.0, target - self.clock.monotonic()))
        await settle()


class FakeConnection:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.inbox: asyncio.Queue[str | Closed] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    async def recv(self) -> str:
        item = await self.inbox.get()
        if isinstance(item, Closed):
            self.inbox.put_nowait(item)
            raise item
        return item

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self) -> None:
        self.server_close(1000)

    def push(self, frame: dict[str, Any]) -> None:
        self.inbox.put_nowait(json.dumps(frame))

    def server_close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.inbox.put_nowait(Closed(code, reason))

    @property
    def route(self) -> str:
        return "fallback" if self.url.startswith(FALLBACK_URL) else "stream"


class FakeTransport:
    """Connections to routes not in ``down``; each new one is greeted by ``greet(conn)``."""

    def __init__(self, greet: Any = None) -> None:
        self.down: set[str] = set()
        self.attempts: list[str] = []
        self.connections: list[FakeConnection] = []
        self.greet = greet

    async def connect(self, url: str, token: str, *, open_timeout: float) -> FakeConnection:
        self.attempts.append(url)
        route = "fallback" if url.startswith(FALLBACK_URL) else "stream"
        if route in self.down:
            raise ConnectFailed("refused")
        conn = FakeConnection(url, token)
        if self.greet is not None:
            self.greet(conn)
        self.connections.append(conn)
        return conn

    @property
    def live(self) -> FakeConnection:
        return self.connections[-1]


class FakeGateway:
    """Descriptors whose tokens live ``ttl`` seconds (by the clock), and the HTTP routes the
    stream reconciles against (``activations``: world → entries)."""

    def __init__(self, clock: ManualClock, *, ttl: float = 60.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self.subscribes = 0
        self.reachable = True
        self.activations: dict[str, list[dict[str, Any]]] = {}

    async def subscribe(self, topics: Any, **kw: Any) -> dict[str, Any]:
        if not self.reachable:
            raise TransportError("unreachable")
        self.subscribes += 1
        iat = int(self.clock.time())
        token = jwt.encode({"iat": iat, "exp": iat + int(self.ttl), "n": self.subscribes}, "k" * 32, algorithm="HS256")
        return {"stream_url": STREAM_URL, "token": token, "topics": list(topics), "expires_at": "",
                "fallback_url": FALLBACK_URL}

    async def list_activations(self, world_id: str) -> dict[str, Any]:
        if not self.reachable:
            raise TransportError("unreachable")
        return {"activations": list(self.activations.get(world_id, []))}

    async def aclose(self) -> None:
        pass


def activation(world: str, sid: str, *, active: bool = True, etag: str = "e1", ts: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"type": "ActivationUpdated", "version": 1, "world_id": world, "strategy_id": sid, "side": "long",
            "active": active, "weight": 1.0 if active else 0.0, "etag": etag, "ts": ts}


def snapshot(world: str, items: list[dict[str, Any]], seq: int = 1, epoch: str = "ep") -> dict[str, Any]:
    return {"type": "snapshot", "id": f"{epoch}.{seq}", "seq": seq,
            "data": {"topic": "activation", "world_id": world, "items": items}}


def change(world: str, sid: str, seq: int, epoch: str = "ep", **kw: Any) -> dict[str, Any]:
    return {"type": "activation_updated", "id": f"{epoch}.{seq}", "seq": seq, "data": activation(world, sid, **kw)}
