"""The WebSocket routes ``/ws/evt`` and ``/ws`` as raw ASGI apps (mounted by the app's
dispatcher beside Connexion). Each connection: authenticate → accept → attach (snapshot
or resume, atomically) → one writer task draining the client's buffer + one reader task
watching for the client's close. Refusals are an accept followed by a close with the
documented code (1008 policy, 1013 try again later), so every client library sees a code.

A stream lives as long as its token: when the token's ``exp`` passes, the Gateway closes
it with 1008 (reason ``token expired``), unless the client sent a fresh token on the open
stream first: a text message ``{"type": "refresh", "token": "<token>"}`` (same subject, at
least the stream's scope) moves the end to the new token's ``exp`` (plus the verification
leeway, :data:`EXPIRY_GRACE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qmtl.contracts.app import ABORT_KEY

from .hub import Subscriber

if TYPE_CHECKING:  # pragma: no cover
    from .component import EventsComponent

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_TOO_SLOW = 4008
# Seconds past a token's exp before its stream is closed: the leeway the token verification
# allows (tokens carry whole-second exp; a client refreshing "on time" must not lose).
EXPIRY_GRACE = 2.0
CLOSE_TOO_MANY = 4029  # this subject holds gateway.events.max_connections_per_subject streams already


class StreamRefused(Exception):
    def __init__(self, code: int, reason: str, label: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.label = label


class ConnectionCaps:
    """Open streams in total and per subject (``gateway.events.max_connections`` and
    ``max_connections_per_subject``). A refusal is a close with 1013 (the Gateway is full:
    try again later) or 4029 (this subject holds its share), counted in ``ws_rejected``.
    The development subject (anonymous callers in development mode, all one subject) has
    only the total cap."""

    def __init__(self, total: int, per_subject: int, exempt_subject: str | None = None) -> None:
        self.total = total
        self.per_subject = per_subject
        self.exempt_subject = exempt_subject
        self.open = 0
        self.by_subject: dict[str, int] = {}

    def reserve(self) -> None:
        if self.open >= self.total:
            raise StreamRefused(CLOSE_TRY_AGAIN, f"the Gateway holds its maximum of {self.total} streams; retry later", "total_cap")
        self.open += 1

    def reserve_subject(self, subject: str | None) -> str | None:
        if not subject or subject == self.exempt_subject:
            return None
        held = self.by_subject.get(subject, 0)
        if held >= self.per_subject:
            raise StreamRefused(CLOSE_TOO_MANY, f"this subject holds its maximum of {self.per_subject} streams; close one first", "subject_cap")
        self.by_subject[subject] = held + 1
        return subject

    def release(self, subject: str | None) -> None:
        self.open -= 1
        if subject is not None:
            left = self.by_subject.get(subject, 1) - 1
            if left > 0:
                self.by_subject[subject] = left
            else:
                self.by_subject.pop(subject, None)


class StreamEndpoint:
    """ASGI app of one route (``legacy`` selects ``/ws`` semantics)."""

    def __init__(self, component: EventsComponent, route: str, *, legacy: bool) -> None:
        self.component = component
        self.route = route
        self.legacy = legacy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        comp = self.component
        caps = comp.caps
        subject = None
        try:
            caps.reserve()  # the total cap, before any work for this connection
            try:
                sub, last_event_id = await comp.open_subscription(scope, route=self.route, legacy=self.legacy)
                subject = caps.reserve_subject(sub.subject)
            except BaseException:
                caps.release(None)
                raise
        except StreamRefused as refused:
            comp.metrics.ws_rejected.labels(self.route, refused.label).inc()
            if refused.label not in ("total_cap", "subject_cap"):  # cap refusals are counted, not logged one by one
                log.info("refused %s subscriber: %s (close %d)", self.route, refused.reason, refused.code)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": refused.code, "reason": refused.reason[:120]})
            return
        try:
            try:
                await send({"type": "websocket.accept"})
            except Exception:
                return
            comp.hub.attach(sub, last_event_id=last_event_id, snapshot=comp.snapshot_frames)
            await self._serve(sub, receive, send, scope.get(ABORT_KEY))
        finally:
            caps.release(subject)

    async def _serve(self, sub: Subscriber, receive: Any, send: Any, abort: Callable[[], bool] | None = None) -> None:
        comp = self.component
        writer = asyncio.create_task(self._write(sub, send))
        sub.writer = writer
        reader = asyncio.create_task(self._read(receive, sub))
        expiry = asyncio.create_task(self._expire(sub))
        try:
            await asyncio.wait({writer, reader, expiry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            comp.hub.detach(sub)
            for task in (writer, reader, expiry):
                if not task.done():
                    task.cancel()
            await asyncio.gather(writer, reader, expiry, return_exceptions=True)
        if reader.done() and not reader.cancelled() and reader.exception() is None:
            return  # the client closed: nothing to say
        expired = expiry.done() and not expiry.cancelled() and expiry.exception() is None
        if expired:
            comp.metrics.ws_rejected.labels(self.route, "token_expired").inc()
            log.info("closing %s subscriber %s: its token expired", self.route, sub.subject or "-")
            code, reason = CLOSE_POLICY, "token expired: send a fresh token on the stream before exp, or reconnect"
        elif sub.dropped:
            code, reason = CLOSE_TOO_SLOW, "subscriber fell behind; reconnect (with last_event_id) to resume"
        elif sub.closing:
            code, reason = CLOSE_GOING_AWAY, "gateway shutting down"
        else:
            return  # the connection failed under the writer
        # A stalled client may never drain its socket: bound the wait for the close frame, then
        # drop the connection, or its socket and send buffer would stay with us for as long as
        # the peer stays alive without reading.
        sent = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(send({"type": "websocket.close", "code": code, "reason": reason}), comp.close_grace)
            sent = True
        if not sent and abort is not None and abort():
            comp.metrics.ws_aborted.labels(self.route).inc()
            log.info("aborted the connection of %s subscriber %s: close frame not taken within %.1fs",
                     self.route, sub.subject or "-", comp.close_grace)

    @staticmethod
    async def _write(sub: Subscriber, send: Any) -> None:
        buf = sub.buffer
        items = buf.items
        while not sub.closing:
            if not items:
                await buf.wait()
                continue
            await send({"type": "websocket.send", "text": items.popleft()})

    @staticmethod
    async def _expire(sub: Subscriber) -> None:
        """Returns when the subscriber's token has expired (never when it has no expiry)."""
        while True:
            exp = sub.expires_at
            if exp is None:
                await asyncio.Event().wait()
                return
            delay = exp + EXPIRY_GRACE - time.time()
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, 60.0))

    async def _read(self, receive: Any, sub: Subscriber) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text and '"refresh"' in text:
                await self._on_refresh(sub, text)

    async def _on_refresh(self, sub: Subscriber, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("type") != "refresh" or not isinstance(msg.get("token"), str):
            return
        try:
            until = await self.component.refresh(sub, msg["token"])
        except Exception as exc:  # a bad refresh changes nothing: the stream still ends at its exp
            log.info("refresh on %s for %s refused: %s", self.route, sub.subject or "-", exc)
            return
        log.debug("%s subscriber %s refreshed until %.0f", self.route, sub.subject or "-", until)
