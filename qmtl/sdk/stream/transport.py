"""The WebSocket transport: open a connection with a bearer token (``open_timeout``), receive
and send text frames, close; a close by the server surfaces as :class:`Closed` with its code.

:class:`Transport` / :class:`Connection` are the narrow interface the session uses, so a test
can hand the stream a transport of its own; :class:`WebSocketTransport` is the real one
(``websockets``). Also here: the close codes the session reacts to and the resume URL
(``?last_event_id=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_TOO_SLOW",
    "CLOSE_TRY_AGAIN",
    "Closed",
    "ConnectFailed",
    "Connection",
    "Transport",
    "WebSocketTransport",
    "frame_type",
    "resume_url",
]

CLOSE_POLICY = 1008  # the token (or its scope) was refused
CLOSE_TRY_AGAIN = 1013  # the Gateway is at capacity
CLOSE_TOO_SLOW = 4008  # this consumer fell behind: reconnect and resume
CLOSE_GOING_AWAY = 1001


class Closed(Exception):
    """The connection was closed; ``code`` is the close frame's code when one was received."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed ({code}: {reason})" if code is not None else "closed")
        self.code = code
        self.reason = reason


class ConnectFailed(Exception):
    """No connection: refused, unreachable, a bad URI or a handshake that failed or timed out."""


class Connection(Protocol):
    async def recv(self) -> str | bytes:
        """The next frame; raises :class:`Closed` when the connection is closed."""

    async def send(self, text: str) -> None: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    async def connect(self, url: str, token: str, *, open_timeout: float) -> Connection:
        """An open connection to ``url`` with ``Authorization: Bearer <token>``; raises
        :class:`ConnectFailed` when there is none."""


class _WebSocket:
    def __init__(self, ws: Any) -> None:
        self._ws = ws

    async def recv(self) -> str | bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            text: str | bytes = await self._ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise Closed(rcvd.code if rcvd is not None else None, rcvd.reason if rcvd is not None else "") from exc
        return text

    async def send(self, text: str) -> None:
        await self._ws.send(text)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 2)


class WebSocketTransport:
    """``websockets`` client connections: no proxy, unlimited frame size, pings every 20 s."""

    async def connect(self, url: str, token: str, *, open_timeout: float) -> Connection:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidURI

        try:
            ws = await asyncio.wait_for(
                connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=open_timeout,
                        max_size=None, proxy=None, ping_interval=20, ping_timeout=20, close_timeout=2),
                open_timeout + 1,
            )
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        return _WebSocket(ws)


def resume_url(url: str, last_event_id: str | None) -> str:
    """``url`` asking the Gateway to resume after ``last_event_id`` (unchanged without one)."""
    if not last_event_id:
        return url
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), ("last_event_id", last_event_id)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def frame_type(text: str | bytes | None) -> str | None:
    """The ``type`` of a JSON frame (None when it is not one)."""
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    kind = doc.get("type") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else None
