"""WebSocket fan-out: serialise once per event, one bounded buffer and writer per client.

* :meth:`Hub.publish` builds the CloudEvents frame of an event once, encodes it once,
  numbers it (``seq``, one per frame relayed by this Gateway process), keeps it in a
  bounded replay ring, and appends the same ``str`` to the buffer of every subscriber
  whose scope wants it. Nothing here awaits: ordering per key is the order of calls.
* A subscriber whose buffer is full is *dropped* (:meth:`Hub.drop`): removed, counted in
  ``ws_dropped_subscribers_total`` and its connection closed with **4008**. Nobody else
  waits for it.
* Frame ids are ``<epoch>.<seq>`` where ``epoch`` identifies this Gateway process;
  snapshot and heartbeat frames are ``<epoch>.<seq>.<kind>...`` with the ``seq`` of the
  last frame they account for. A client that reconnects with ``last_event_id`` resumes
  from the ring when this process still holds every frame after it; otherwise it gets a
  fresh snapshot (:meth:`Hub.attach`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from qmtl.common.cloudevents import encode_text, make_event
from qmtl.contracts.constants import StreamTopic

from .memory import MemoryTrimmer
from .metrics import EventMetrics

log = logging.getLogger(__name__)

# Scope kinds of a frame (the ``topic`` label of event_fanout_total).
KIND_ACTIVATION = StreamTopic.ACTIVATION
KIND_POLICY = StreamTopic.POLICY
KIND_QUEUES = StreamTopic.QUEUES
KIND_SENTINEL = "sentinel"
KIND_INGEST = "ingest"
KIND_HEARTBEAT = "heartbeat"

# A frame's routing metadata: (kind, world_id, queue key, strategy_id).
Meta = tuple


class ClientBuffer:
    """A bounded FIFO of encoded frames with one waiting writer (cheaper than asyncio.Queue)."""

    __slots__ = ("_waiter", "items", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.items: deque[str] = deque()
        self.maxsize = maxsize
        self._waiter: asyncio.Future | None = None

    def push(self, text: str) -> bool:
        if len(self.items) >= self.maxsize:
            return False
        self.items.append(text)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        return True

    def wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        if self.items:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def __len__(self) -> int:
        return len(self.items)


class Subscriber:
    """One connected client: its scope, its buffer, its state."""

    __slots__ = (
        "buffer",
        "closing",
        "dropped",
        "expires_at",
        "queue_keys",
        "route",
        "snapshots",
        "strategy_id",
        "subject",
        "topics",
        "world_id",
        "world_visible",
        "writer",
    )

    def __init__(
        self,
        route: str,
        *,
        topics: Iterable[str] = tuple(StreamTopic),
        world_id: str | None = None,
        strategy_id: str | None = None,
        queue_keys: Iterable[tuple] | None = None,
        world_visible: Callable[[str], bool] | None = None,
        snapshots: bool = False,
        queue_size: int = 1024,
        subject: str = "",
    ) -> None:
        self.route = route
        self.topics = frozenset(topics)
        self.world_id = world_id
        self.strategy_id = strategy_id
        # None: every queue key; otherwise the set of (tags, interval, match_mode) followed.
        self.queue_keys = frozenset(queue_keys) if queue_keys is not None else None
        # Legacy stream: which worlds' activation/policy frames this client may see.
        self.world_visible = world_visible
        self.snapshots = snapshots
        self.buffer = ClientBuffer(queue_size)
        self.dropped = False
        self.closing = False
        self.writer: asyncio.Task | None = None
        self.subject = subject
        # When its token expires (epoch seconds; None: never), unless refreshed on the stream.
        self.expires_at: float | None = None

    def wants(self, meta: Meta) -> bool:
        kind, world_id, qkey, strategy_id = meta
        if kind in (KIND_ACTIVATION, KIND_POLICY):
            if kind not in self.topics:
                return False
            if self.world_id is not None:
                return world_id == self.world_id
            visible = self.world_visible
            return visible is None or visible(world_id)
        if kind == KIND_QUEUES:
            if KIND_QUEUES not in self.topics:
                return False
            keys = self.queue_keys
            return keys is None or qkey in keys
        if kind == KIND_SENTINEL:
            # Sentinel traffic weights ride the activation topic (they gate traffic too);
            # they are not world-scoped.
            return KIND_ACTIVATION in self.topics
        if kind == KIND_INGEST:
            # progress / queue_map of a submission: the descriptor stream delivers them to
            # the strategy's own token (or, when the relay names a world, to that world).
            if self.snapshots:
                if strategy_id is not None and strategy_id == self.strategy_id:
                    return True
                return world_id is not None and world_id == self.world_id
            if world_id is not None and self.world_visible is not None:
                return self.world_visible(world_id)
            return True
        return False


def parse_event_id(value: str | None) -> tuple[str, int] | None:
    """``<epoch>.<seq>[...]`` → (epoch, seq); None when it is not one of ours."""
    if not value:
        return None
    parts = value.split(".")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Hub:
    def __init__(
        self,
        metrics: EventMetrics,
        *,
        source: str,
        queue_size: int = 1024,
        replay_size: int = 10_000,
        heartbeat_interval: float = 15.0,
        on_drop: Callable[[Subscriber], None] | None = None,
        trimmer: MemoryTrimmer | None = None,
    ) -> None:
        self.metrics = metrics
        self.source = source
        self.queue_size = queue_size
        self.heartbeat_interval = heartbeat_interval
        self.epoch = secrets.token_hex(6)
        self.seq = 0
        self.replay: deque[tuple[int, Meta, str]] = deque(maxlen=max(1, replay_size))
        self.subscribers: list[Subscriber] = []
        self._on_drop = on_drop
        self._trimmer = trimmer  # after a burst of closes, memory back to the OS (see .memory)
        self._hb_task: asyncio.Task | None = None
        self._hb_count = itertools.count(1)
        self._fanout = {k: metrics.event_fanout.labels(k) for k in (KIND_ACTIVATION, KIND_POLICY, KIND_QUEUES, KIND_SENTINEL, KIND_INGEST, KIND_HEARTBEAT)}
        self._gauges: dict[str, Any] = {}
        self._relayed: dict[str, Any] = {}  # events_relayed's child per frame type (a few types)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.heartbeat_interval > 0 and self._hb_task is None:
            self._hb_task = asyncio.create_task(self._heartbeats(), name="gateway-ws-heartbeats")

    async def stop(self) -> None:
        task, self._hb_task = self._hb_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in list(self.subscribers):
            sub.closing = True
            sub.buffer.wake()

    # -- frames ----------------------------------------------------------------------------
    def frame(self, type_: str, data: Any, *, id_: str, subject: str | None = None, extensions: dict | None = None) -> str:
        event = make_event(type_, data, source=self.source, id=id_, subject=subject, extensions=extensions)
        return encode_text(event)

    def publish(self, type_: str, data: Any, meta: Meta, *, subject: str | None = None, extensions: dict | None = None) -> int:
        """Number, encode once and fan out one event; returns how many subscribers got it."""
        self.seq += 1
        seq = self.seq
        ext = {"seq": seq}
        if extensions:
            ext.update(extensions)
        text = self.frame(type_, data, id_=f"{self.epoch}.{seq}", subject=subject, extensions=ext)
        self.replay.append((seq, meta, text))
        delivered = 0
        overflowed: list[Subscriber] | None = None
        for sub in self.subscribers:
            if sub.wants(meta):
                if sub.buffer.push(text):
                    delivered += 1
                else:
                    if overflowed is None:
                        overflowed = []
                    overflowed.append(sub)
        if overflowed:
            for sub in overflowed:
                self.drop(sub)
        if delivered:
            self._fanout[meta[0]].inc(delivered)
        relayed = self._relayed.get(type_)
        if relayed is None:
            relayed = self._relayed[type_] = self.metrics.events_relayed.labels(type_)
        relayed.inc()
        return delivered

    # -- subscribers ----------------------------------------------------------------------
    def attach(
        self,
        sub: Subscriber,
        *,
        last_event_id: str | None = None,
        snapshot: Callable[[Subscriber, int], list[str]] | None = None,
    ) -> str:
        """Register ``sub`` and queue what it must see first; returns how it started:
        ``resumed`` (the missed frames from the ring), ``snapshot`` or ``live``.

        Runs without awaiting, so no event can slip between the snapshot (or the
        replayed frames) and the live frames that follow."""
        start = "live"
        missed = self._missed(sub, last_event_id) if last_event_id else None
        if missed is not None and len(missed) <= sub.buffer.maxsize:
            for text in missed:
                sub.buffer.push(text)
            start = "resumed"
        elif snapshot is not None and sub.snapshots:
            for text in snapshot(sub, self.seq):
                sub.buffer.items.append(text)  # a snapshot may exceed the live bound once
            start = "snapshot"
        self.subscribers.append(sub)
        self._gauge(sub.route).inc()
        self.metrics.ws_connections.labels(sub.route, start).inc()
        return start

    def _missed(self, sub: Subscriber, last_event_id: str) -> list[str] | None:
        parsed = parse_event_id(last_event_id)
        if parsed is None:
            return None
        epoch, last = parsed
        if epoch != self.epoch or last > self.seq:
            return None
        if last == self.seq:
            return []
        if not self.replay or self.replay[0][0] > last + 1:
            return None  # some of what it missed is gone: a full snapshot instead
        start = last + 1 - self.replay[0][0]
        return [text for _seq, meta, text in itertools.islice(self.replay, start, None) if sub.wants(meta)]

    def detach(self, sub: Subscriber) -> None:
        try:
            self.subscribers.remove(sub)
        except ValueError:
            return
        self._gauge(sub.route).dec()
        if self._trimmer is not None:
            self._trimmer.closed()

    def drop(self, sub: Subscriber) -> None:
        """``sub`` fell too far behind: stop feeding it, count it, close it with 4008."""
        if sub.dropped:
            return
        sub.dropped = True
        self.detach(sub)
        sub.buffer.items.clear()
        self.metrics.ws_dropped_subscribers.labels(sub.route).inc()
        log.info("dropping slow WebSocket subscriber %s on %s (buffer of %d frames full)", sub.subject or "-", sub.route, sub.buffer.maxsize)
        if sub.writer is not None and not sub.writer.done():
            sub.writer.cancel()
        if self._on_drop is not None:
            self._on_drop(sub)

    def _gauge(self, route: str) -> Any:
        g = self._gauges.get(route)
        if g is None:
            g = self._gauges[route] = self.metrics.ws_subscribers.labels(route)
        return g

    # -- heartbeats -----------------------------------------------------------------------
    def heartbeat(self) -> None:
        """One heartbeat frame (encoded once) to every subscriber."""
        n = next(self._hb_count)
        text = self.frame("heartbeat", {"ts": _now_iso()}, id_=f"{self.epoch}.{self.seq}.hb{n}", extensions={"seq": self.seq})
        overflowed = [sub for sub in self.subscribers if not sub.buffer.push(text)]
        for sub in overflowed:
            self.drop(sub)
        delivered = len(self.subscribers)
        if delivered:
            self._fanout[KIND_HEARTBEAT].inc(delivered)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                self.heartbeat()
            except Exception:  # never let the heartbeat task die
                log.exception("heartbeat failed")
