"""Session: keep a connection open for as long as the stream runs.

* the descriptor and its token: subscribe, refresh at ``refresh_at`` of the token's lifetime
  (read from its own ``iat``/``exp``), hand the open connection the new token;
* the connection loop: ``stream_url`` first, ``fallback_url`` right after it once
  ``fallback_after`` rounds failed, jittered exponential backoff between rounds, resume from
  the last applied frame, back to ``stream_url`` after ``primary_retry_interval`` on the
  fallback route, fail for good when the subscription itself is refused;
* the HTTP reconcile while the stream stays down longer than ``reconcile_after``.

Every wait for time to pass goes through the injected ``sleep`` and ``monotonic`` clock
(waits for I/O — the handshake, a frame within ``idle_timeout`` — are real timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qmtl.sdk.client import GatewayClient
from qmtl.sdk.errors import ProblemError, QmtlError, StreamError
from qmtl.sdk.state import parse_ts
from qmtl.sdk.types import StreamDescriptor

from .events import StreamStats
from .health import StreamHealth
from .options import StreamOptions
from .subscription import Subscription
from .sync import Sync
from .transport import (
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    CLOSE_TRY_AGAIN,
    Closed,
    ConnectFailed,
    Connection,
    Transport,
    frame_type,
    resume_url,
)

__all__ = ["REFUSED_FOR_GOOD", "Session", "token_lifetime"]

log = logging.getLogger("qmtl.sdk.stream")

Sleep = Callable[[float], Awaitable[None]]

#: answers to the subscription that retrying will not change
REFUSED_FOR_GOOD = (400, 401, 403, 404, 422)


class Session:
    def __init__(
        self,
        client: GatewayClient,
        subscription: Subscription,
        sync: Sync,
        *,
        health: StreamHealth,
        stats: StreamStats,
        options: StreamOptions,
        transport: Transport,
        fail: Callable[[BaseException], None],
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        sleep: Sleep,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.sub = subscription
        self.sync = sync
        self.health = health
        self.stats = stats
        self.options = options
        self.transport = transport
        self._fail = fail
        self._monotonic = monotonic
        self._wall = wall
        self._sleep = sleep
        self._rng = rng
        self.descriptor: StreamDescriptor | None = None
        self._desc_at = 0.0  # monotonic time the descriptor was received
        self._desc_lifetime = 0.0
        self._desc_lock = asyncio.Lock()
        self._conn: Connection | None = None
        self._back_to_primary = False
        self.stopping = False

    # -- descriptor and token ----------------------------------------------------------------------
    async def refresh_descriptor(self, *, initial: bool = False) -> StreamDescriptor:
        async with self._desc_lock:
            desc = await self.client.subscribe(
                self.sub.topics, world_id=self.sub.world_id, strategy_id=self.sub.strategy_id,
                queue_keys=self.sub.queue_key_bodies(),
            )
            if self.descriptor is not None and not initial:
                self.stats.token_refreshes += 1
            self.stats.descriptors += 1
            self.descriptor = desc
            self._desc_at = self._monotonic()
            self._desc_lifetime = token_lifetime(desc, self._wall)
        conn = self._conn
        if conn is not None and not initial:
            # The Gateway closes a stream (1008) when its token expires: hand it the fresh one.
            with contextlib.suppress(Exception):
                await conn.send(json.dumps({"type": "refresh", "token": desc["token"]}))
        return desc

    def _token_due(self) -> float:
        """Monotonic time at which the token should be refreshed."""
        return self._desc_at + self._desc_lifetime * self.options.refresh_at

    async def _ensure_descriptor(self) -> StreamDescriptor:
        if self.descriptor is None or self._monotonic() >= self._token_due():
            return await self.refresh_descriptor()
        return self.descriptor

    async def refresh_loop(self) -> None:
        failures = 0
        while not self.stopping:
            if self.descriptor is None:
                await self._sleep(0.2)
                continue
            wait = self._token_due() - self._monotonic()
            if wait > 0:
                await self._sleep(min(wait, 60.0))
                continue
            try:
                await self.refresh_descriptor()
                failures = 0
                log.debug("event stream: token refreshed (lifetime %.1fs)", self._desc_lifetime)
            except QmtlError as exc:
                failures += 1
                delay = min(self.options.reconnect_max, 0.2 * 2 ** min(failures, 6))
                log.info("event stream: token refresh failed (%s); retrying in %.1fs", exc, delay)
                await self._sleep(delay)

    # -- the connection loop ------------------------------------------------------------------------
    async def run(self) -> None:
        failures = 0
        policy_refusals = 0
        while not self.stopping:
            try:
                desc = await self._ensure_descriptor()
            except ProblemError as exc:
                if exc.status in REFUSED_FOR_GOOD:
                    self._fail(StreamError(f"the Gateway refused the subscription: {exc}"))
                    return
                failures += 1
                self.health.went_down()
                await self._sleep_backoff(failures)
                continue
            except QmtlError as exc:
                failures += 1
                self.health.went_down()
                log.debug("event stream: no descriptor (%s)", exc)
                await self._sleep_backoff(failures)
                continue
            # stream_url first; after fallback_after failures in a row, fallback_url right
            # after it in the same round (so a healthy stream_url is always preferred)
            routes = ["stream"]
            if failures >= self.options.fallback_after and desc.get("fallback_url"):
                routes.append("fallback")
            opened, code = False, None
            for route in routes:
                url = desc["fallback_url"] if route == "fallback" else desc["stream_url"]
                opened, code = await self._connect_and_read(url, desc["token"], route)
                if self.stopping:  # set by stop() while the read was awaited (mypy narrowed it to False)
                    return  # type: ignore[unreachable]
                if code is not None:
                    self.stats.refusals[code] = self.stats.refusals.get(code, 0) + 1
                if opened or code == CLOSE_POLICY:
                    break
                self.stats.connect_failures += 1
            if code == CLOSE_POLICY:
                self.descriptor = None  # the token (or its scope) was refused: get a new one
            if code == CLOSE_POLICY and not opened:
                policy_refusals += 1
                if policy_refusals > 3:
                    self._fail(StreamError("the stream keeps refusing fresh tokens (close 1008)", code=code))
                    return
            elif opened:
                policy_refusals = 0
            if opened:
                failures = 0
                if code == CLOSE_TOO_SLOW or self._back_to_primary:
                    self._back_to_primary = False
                    continue  # reconnect at once, resuming from the last applied frame
            else:
                failures += 1
            await self._sleep_backoff(max(1, failures))

    def backoff(self, failures: int) -> float:
        """The delay before the next round after ``failures`` failed ones (jittered)."""
        o = self.options
        cap = min(o.reconnect_max, o.reconnect_base * 2 ** min(failures - 1, 16))
        return self._rng.uniform(cap / 2, cap)

    async def _sleep_backoff(self, failures: int) -> None:
        await self._sleep(self.backoff(failures))

    async def _connect_and_read(self, url: str, token: str, route: str) -> tuple[bool, int | None]:
        """One connection: returns (opened, close code)."""
        last_event_id = self.sync.resume_from()
        resuming = last_event_id is not None
        try:
            conn = await self.transport.connect(resume_url(url, last_event_id), token, open_timeout=self.options.open_timeout)
        except ConnectFailed as exc:
            log.debug("event stream: cannot connect to %s (%s)", url, exc)
            self.health.went_down()
            return False, None
        self._conn = conn
        self.stats.connects += 1
        if route == "fallback":
            self.stats.fallback_connects += 1
        self.sync.connected(route, resuming=resuming)
        code: int | None = None
        opened = False
        back_timer: asyncio.Task[None] | None = None
        try:
            # A refused connection is accepted and closed at once with its code; anything
            # else within the grace period (a frame, or silence) means it is open.
            try:
                text: str | bytes | None = await asyncio.wait_for(conn.recv(), self.options.refusal_grace)
            except TimeoutError:
                text = None
            opened = True
            self._came_up(route)
            if resuming and route == "stream" and frame_type(text) != "snapshot":
                self.stats.resumes += 1
            if route == "fallback":
                back_timer = asyncio.create_task(self._back_to_primary_after(conn), name="qmtl-stream-primary-retry")
            while not self.stopping:
                if text is not None:
                    await self.sync.on_text(text, route)
                try:
                    text = await asyncio.wait_for(conn.recv(), self.options.idle_timeout)
                except TimeoutError:
                    log.info("event stream: nothing heard for %.0fs; reconnecting", self.options.idle_timeout)
                    break
        except Closed as exc:
            # our own close to go back to stream_url is no refusal
            code = None if self._back_to_primary else exc.code
            if code in (CLOSE_POLICY, CLOSE_TRY_AGAIN):
                log.info("event stream: %s refused the connection (close %s: %s)", route, code, exc.reason)
                if not opened:
                    self.health.went_down()
            else:
                log.debug("event stream: connection closed (%s)", code)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in a handler must not kill the stream silently
            log.exception("event stream: frame handling failed")
        finally:
            if back_timer is not None:
                back_timer.cancel()
            self._conn = None
            await conn.close()
            if not self.stopping:
                self.health.went_down()
        return opened, code

    async def _back_to_primary_after(self, conn: Connection) -> None:
        """On the fallback route: after ``primary_retry_interval``, leave it for ``stream_url``
        (the run loop reconnects at once, resuming, so nothing is lost in the switch)."""
        await self._sleep(self.options.primary_retry_interval)
        log.info("event stream: trying stream_url again (on the fallback route for %.0fs)",
                 self.options.primary_retry_interval)
        self._back_to_primary = True
        await conn.close()

    def _came_up(self, route: str) -> None:
        self.health.came_up(route)
        if route == "fallback" and self.sync.verify_with_source:
            # the legacy route sends no snapshot: confirm the copy over HTTP
            self.sync.schedule_verify_all()

    async def drop_connection(self) -> None:
        """Close the open connection (the run loop reconnects)."""
        conn = self._conn
        if conn is not None:
            await conn.close()

    # -- while the stream stays down --------------------------------------------------------------------
    async def reconcile_loop(self) -> None:
        o = self.options
        while not self.stopping:
            await self._sleep(o.reconcile_interval)
            down = self.health.down_for()
            if down is None or down < o.reconcile_after:
                continue
            if await self.sync.reconcile():
                # the copy moved on without the stream: resuming from the old position
                # could replay older frames over newer entries, so ask for a snapshot
                self.sync.resnapshot = True


def token_lifetime(desc: Mapping[str, Any], wall: Callable[[], float]) -> float:
    """Seconds the token lives, from its own ``iat``/``exp`` (immune to clock skew), else
    from ``expires_at`` against the local clock."""
    import jwt

    try:
        claims = jwt.decode(desc["token"], options={"verify_signature": False})
        exp, iat = float(claims["exp"]), float(claims.get("iat") or 0)
        if iat and exp > iat:
            return exp - iat
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
        log.debug("event stream: the token's lifetime is not readable; using expires_at")
    expires = parse_ts(desc.get("expires_at"))
    if expires is not None:
        return max(1.0, expires - wall())
    return 60.0
