"""EventStream: the public object. It composes the subscription, the local copy and its sync,
the session (descriptor, connection, reconnects) and the delivery of events, and owns the
lifecycle (start, stop, ``async with``, ``async for``). See :mod:`qmtl.sdk.stream`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Self

from qmtl.common.clock import SYSTEM_CLOCK, Clock
from qmtl.sdk.client import GatewayClient
from qmtl.sdk.errors import ProblemError, QmtlError
from qmtl.sdk.state import QueueKey, StreamState
from qmtl.sdk.types import StreamDescriptor

from .events import Delivery, Listener, StreamEvent, StreamStats
from .health import StreamHealth
from .options import StreamOptions, options_from_keywords
from .session import REFUSED_FOR_GOOD, Session
from .subscription import Subscription
from .sync import Sync
from .transport import Transport, WebSocketTransport

__all__ = ["EventStream"]

log = logging.getLogger("qmtl.sdk.stream")


class EventStream:
    """See :mod:`qmtl.sdk.stream`.

    :param client: a :class:`GatewayClient` (or the Gateway's base URL).
    :param topics: any of ``activation``, ``policy``, ``queues``.
    :param world_id: the world (needed for ``activation`` and ``policy``).
    :param strategy_id: also deliver this strategy's ``progress``/``queue_map`` frames.
    :param queue_keys: ``(tags, interval, match_mode)`` keys to follow (``queues``).
    :param on_event: callback (sync or async) for each :class:`StreamEvent`; without one,
        events are buffered for ``async for`` (``options.max_buffer`` of them, oldest dropped).
    :param include_heartbeats: deliver the Gateway's ``heartbeat`` frames too.
    :param verify_with_source: check snapshots and mismatches against WorldService / the
        DAG Manager over HTTP (recommended: a Gateway restarted on an in-process bus may
        hold less than the source of truth).
    :param options: the tuning knobs (:class:`StreamOptions`: backoff, fallback, token
        refresh, reconcile, timeouts, buffer). Passing them as keywords
        (``reconnect_max=0.5``) still works but is deprecated.
    :param clock: wall and monotonic time (:class:`qmtl.common.clock.Clock`); ``sleep``:
        how the stream waits for time to pass (backoff, token refresh, reconcile, primary
        retry). Tests pass a ``ManualClock`` and a sleep it drives.
    :param transport: how connections are opened (the WebSocket transport by default).
    """

    def __init__(
        self,
        client: GatewayClient | str,
        *,
        topics: Iterable[str] = ("activation",),
        world_id: str | None = None,
        strategy_id: str | None = None,
        queue_keys: Iterable[Any] = (),
        on_event: Listener | None = None,
        include_heartbeats: bool = False,
        verify_with_source: bool = True,
        options: StreamOptions | None = None,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: Transport | None = None,
        **legacy_options: Any,
    ) -> None:
        self.options = options_from_keywords(options, legacy_options)
        self._owns_client = isinstance(client, str)
        self.client = GatewayClient(client) if isinstance(client, str) else client
        self.subscription = Subscription(topics, world_id=world_id, strategy_id=strategy_id, queue_keys=queue_keys)
        self.include_heartbeats = include_heartbeats
        self.verify_with_source = verify_with_source
        self.stats = StreamStats()
        self.health = StreamHealth(clock.monotonic, idle_timeout=self.options.idle_timeout)
        self.delivery = Delivery(on_event, max_buffer=self.options.max_buffer)
        self.sync = Sync(
            self.client, self.subscription, emit=self.delivery.emit, stats=self.stats, health=self.health,
            resync=self._resync, verify_with_source=verify_with_source, include_heartbeats=include_heartbeats,
            monotonic=clock.monotonic, sleep=sleep,
        )
        self.session = Session(
            self.client, self.subscription, self.sync, health=self.health, stats=self.stats, options=self.options,
            transport=transport if transport is not None else WebSocketTransport(), fail=self._fail,
            monotonic=clock.monotonic, wall=clock.time, sleep=sleep, rng=self.options.random(),
        )
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the stream follows and holds -------------------------------------------------------------
    @property
    def topics(self) -> list[str]:
        return self.subscription.topics

    @property
    def world_id(self) -> str | None:
        return self.subscription.world_id

    @property
    def strategy_id(self) -> str | None:
        return self.subscription.strategy_id

    @property
    def queue_keys(self) -> list[QueueKey]:
        return self.subscription.queue_keys

    @property
    def state(self) -> StreamState:
        """The local copy."""
        return self.sync.state

    @property
    def status(self) -> str:
        """idle | connecting | live | down | stopped | failed"""
        return self.health.status

    @property
    def route(self) -> str | None:
        """stream | fallback while live."""
        return self.health.route

    @property
    def descriptor(self) -> StreamDescriptor | None:
        return self.session.descriptor

    @property
    def last_event_id(self) -> str | None:
        return self.sync.last_event_id

    @property
    def error(self) -> BaseException | None:
        return self.delivery.error

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, *, require_descriptor: bool = False) -> Self:
        """Subscribe and start streaming in the background (returns at once; see
        :meth:`wait_synced`). Raises when the Gateway refuses the subscription itself
        (e.g. 403 no read access, 422 bad topic) — or, with ``require_descriptor``, when no
        descriptor can be had now for any reason; otherwise it keeps trying."""
        if self._tasks:
            return self
        self.session.stopping = False
        self.health.connecting()
        try:
            await self.session.refresh_descriptor(initial=True)
        except ProblemError as exc:
            if require_descriptor or exc.status in REFUSED_FOR_GOOD:
                raise
            log.warning("event stream: cannot subscribe yet (%s); retrying in the background", exc)
        except QmtlError as exc:
            if require_descriptor:
                raise
            log.warning("event stream: cannot subscribe yet (%s); retrying in the background", exc)
        self._tasks = [
            asyncio.create_task(self.session.run(), name="qmtl-stream"),
            asyncio.create_task(self.session.refresh_loop(), name="qmtl-stream-refresh"),
            asyncio.create_task(self.session.reconcile_loop(), name="qmtl-stream-reconcile"),
        ]
        return self

    async def stop(self) -> None:
        self.session.stopping = True
        await self.session.drop_connection()
        tasks = self._tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        await self.sync.stop()
        if self.health.status != "failed":
            self.health.status = "stopped"
        self.delivery.close()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until the state holds a full snapshot (or an HTTP reconciliation)."""
        await asyncio.wait_for(self.health.synced.wait(), timeout)

    def add_listener(self, listener: Listener) -> None:
        self.delivery.listeners.append(listener)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self.delivery.iterate()

    async def next_event(self, timeout: float) -> StreamEvent:
        """The next buffered event (TimeoutError after ``timeout`` seconds)."""
        return await self.delivery.next_event(timeout)

    # -- freshness -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.health.status == "live"

    def fresh(self, max_age: float) -> bool:
        """True when the state is current: the stream is live and heard from within
        ``idle_timeout``, or it was last in sync (frame or HTTP reconcile) within ``max_age``."""
        return self.health.fresh(max_age)

    # -- changes -----------------------------------------------------------------------------------------
    async def add_queue_keys(self, keys: Iterable[Any]) -> None:
        """Follow more queue keys: a new descriptor and a fresh snapshot follow."""
        if not self.subscription.add_keys(keys):
            return
        self.sync.resnapshot = True
        self.session.descriptor = None
        await self.session.drop_connection()

    async def reconcile(self) -> bool:
        """Bring the copy up to date over HTTP now (every topic); True when all answered."""
        return await self.sync.reconcile()

    async def _resync(self) -> None:
        await self.session.drop_connection()

    def _fail(self, error: BaseException) -> None:
        log.error("event stream: %s", error)
        self.health.status = "failed"
        self.session.stopping = True
        self.delivery.close(error)
