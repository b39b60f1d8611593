"""The in-process ControlBus for the embedded deployment (one process, one event loop).

It keeps the Kafka contract so that code written against it behaves the same in
production:

* every topic has ``partitions`` partitions; a message goes to ``crc32(key) % N``,
  so per-key order holds;
* a partition is an append-only log with offsets. Retention keeps at most
  ``retention`` messages per partition, and compaction keeps the latest message of
  every key beyond that (the Kafka ``cleanup.policy=compact`` guarantee), so a late
  subscriber rebuilds current state;
* offsets are committed per (consumer_id, topic, partition); a new subscription
  with the same ``consumer_id`` resumes after the last commit;
* every ``consumer_id`` receives every message (fan-out);
* subscribers sleep on an ``asyncio.Event`` that ``publish`` sets: no polling.

Values are stored as JSON text and decoded per delivery, so a subscriber never
shares a mutable dict with the publisher or with another subscriber, and what
cannot cross Kafka (non-JSON values) cannot cross this bus either.

Not thread-safe: call it from the event loop's thread (use
``loop.call_soon_threadsafe`` from elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from types import MappingProxyType

from ._common import PartitionProgress, check_event, encode_event, log, normalise_headers
from .base import BusMessage, ControlBus, EventValidator, InvalidEvent, Subscription
from .errors import BusClosed

__all__ = ["InProcessBus", "InProcessSubscription"]

_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})

# A log entry: (offset, key, payload JSON text, headers, timestamp_ms, checked).
# ``checked`` is True when the payload was validated on publish by this bus's own
# validator, so consuming it need not validate it again.
_Entry = tuple


class _Partition:
    __slots__ = (
        "items",
        "first",
        "head",
        "next_offset",
        "latest",
        "compacted",
        "retention",
    )

    def __init__(self, retention: int) -> None:
        self.items: list[_Entry] = []  # items[i] has offset first + i
        self.first = 0
        self.head = 0  # items[:head] are evicted (kept until the next trim)
        self.next_offset = 0
        self.latest: dict[str, int] = {}  # key -> offset of its latest message
        # Evicted messages that are still the latest of their key, in offset order
        # (all older than the log's first retained offset).
        self.compacted: dict[str, _Entry] = {}
        self.retention = retention

    def append(self, key: str, payload: str, headers: Mapping, ts: int, checked: bool) -> int:
        offset = self.next_offset
        self.items.append((offset, key, payload, headers, ts, checked))
        self.next_offset = offset + 1
        self.latest[key] = offset
        compacted = self.compacted
        if compacted and key in compacted:
            del compacted[key]  # superseded by the new message
        if offset + 1 - (self.first + self.head) > self.retention:
            self._evict_head()
        return offset

    def _evict_head(self) -> None:
        entry = self.items[self.head]
        self.head += 1
        if self.latest.get(entry[1]) == entry[0]:
            self.compacted[entry[1]] = entry
        # Trim in bulk so eviction stays amortised O(1).
        if self.head >= 1024 and self.head * 2 >= len(self.items):
            del self.items[: self.head]
            self.first += self.head
            self.head = 0

    @property
    def log_start(self) -> int:
        return self.first + self.head

    @property
    def earliest(self) -> int:
        for entry in self.compacted.values():
            return entry[0]
        return self.log_start

    def read(self, pos: int, limit: int) -> tuple[list[_Entry], int]:
        """Up to ``limit`` retained entries at or after ``pos``, and the next position."""
        start = self.first + self.head
        out: list[_Entry] = []
        if pos < start:
            if self.compacted:
                out = [e for e in self.compacted.values() if e[0] >= pos]
            pos = start
        i = pos - self.first
        chunk = self.items[i : i + limit]
        if out:
            out.extend(chunk)
        else:
            out = chunk
        return out, pos + len(chunk)

    def __len__(self) -> int:  # retained messages, compacted ones included
        return self.next_offset - self.log_start + len(self.compacted)


class _Topic:
    __slots__ = ("name", "partitions", "subscribers")

    def __init__(self, name: str, partitions: int, retention: int) -> None:
        self.name = name
        self.partitions = [_Partition(retention) for _ in range(partitions)]
        self.subscribers: list[InProcessSubscription] = []


class _Cursor:
    __slots__ = ("topic", "partition", "log", "pos", "progress")

    def __init__(self, topic: str, partition: int, log_: _Partition, pos: int, committed: int | None):
        self.topic = topic
        self.partition = partition
        self.log = log_
        self.pos = pos
        self.progress = PartitionProgress(committed)


class InProcessSubscription(Subscription):
    """A subscription on an :class:`InProcessBus`; iterate it, commit, close."""

    _BATCH = 256

    def __init__(self, bus: InProcessBus, consumer_id: str, cursors: list[_Cursor]) -> None:
        self._bus = bus
        self.consumer_id = consumer_id
        self._cursors = cursors
        self._by_tp = {(c.topic, c.partition): c for c in cursors}
        self._wakeup = asyncio.Event()
        self._closed = False
        self._rr = 0  # round-robin start among cursors
        self._entries: list[_Entry] = []
        self._idx = 0
        self._cur: _Cursor | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> AsyncIterator[BusMessage]:
        return self

    async def __anext__(self) -> BusMessage:
        while True:
            entries = self._entries
            while self._idx < len(entries):
                entry = entries[self._idx]
                self._idx += 1
                msg = self._deliver(self._cur, entry)  # type: ignore[arg-type]
                if msg is not None:
                    return msg
            if self._closed:
                raise StopAsyncIteration
            if not self._fill():
                # No await between the check above and the wait: a publish cannot
                # slip in between (single-threaded), so no wake-up is lost.
                self._wakeup.clear()
                await self._wakeup.wait()

    def _fill(self) -> bool:
        cursors = self._cursors
        n = len(cursors)
        for i in range(n):
            c = cursors[(self._rr + i) % n]
            if c.pos < c.log.next_offset:
                if 0 < c.pos < c.log.log_start:  # a fresh reader at 0 wants just the state
                    log.warning(
                        "%s fell behind retention on %s[%d]: skipping from offset %d to the "
                        "compacted state (latest event per key)", self.consumer_id, c.topic, c.partition, c.pos,
                    )
                entries, c.pos = c.log.read(c.pos, self._BATCH)
                if entries:
                    self._rr = (self._rr + i + 1) % n
                    self._entries = entries
                    self._idx = 0
                    self._cur = c
                    return True
        self._entries = []
        self._idx = 0
        return False

    def _deliver(self, c: _Cursor, entry: _Entry) -> BusMessage | None:
        offset, key, payload, headers, ts, checked = entry
        try:
            value = json.loads(payload)
            if not checked:
                check_event(self._bus._validator, c.topic, value)
        except Exception as exc:  # invalid on the wire: count, skip, never fatal
            self._bus._invalid_events += 1
            log.warning(
                "skipping invalid event on %s[%d]@%d for %s: %s",
                c.topic, c.partition, offset, self.consumer_id, _short(exc),
            )
            target = c.progress.on_skip(offset)
            if target is not None:
                self._bus._store_commit(self.consumer_id, c.topic, c.partition, target)
            return None
        c.progress.on_yield(offset)
        return BusMessage(c.topic, key, value, headers, c.partition, offset, ts)

    async def commit(self, message: BusMessage) -> None:
        cursor = self._by_tp.get((message.topic, message.partition))
        if cursor is None:
            raise ValueError(
                f"message from {message.topic}[{message.partition}] does not belong to this subscription"
            )
        target = cursor.progress.on_commit(message.offset)
        if target is not None:
            self._bus._store_commit(self.consumer_id, message.topic, message.partition, target)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._entries = []
        self._idx = 0
        self._bus._detach(self)
        self._wakeup.set()

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages published but not yet read, per (topic, partition)."""
        pending = len(self._entries) - self._idx
        out = {(c.topic, c.partition): c.log.next_offset - c.pos for c in self._cursors}
        if self._cur is not None and pending > 0:
            key = (self._cur.topic, self._cur.partition)
            out[key] += pending
        return out


class InProcessBus(ControlBus):
    """ControlBus for one process (embedded deployment)."""

    in_process = True

    def __init__(
        self,
        *,
        validator: EventValidator | None = None,
        partitions: int = 4,
        retention: int = 100_000,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if retention < 1:
            raise ValueError("retention must be >= 1")
        self._validator = validator
        self._num_partitions = partitions
        self._retention = retention
        self._topics: dict[str, _Topic] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._invalid_events = 0
        self._started = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise BusClosed("the in-process ControlBus is closed")
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for topic in self._topics.values():
            for sub in list(topic.subscribers):
                await sub.close()

    # -- publish --------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        value: Mapping,
        *,
        key: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.publish_nowait(topic, value, key=key, headers=headers)

    def publish_nowait(
        self,
        topic: str,
        value: Mapping,
        *,
        key: str,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """``publish`` without a coroutine (it never waits); returns the offset."""
        if self._closed:
            raise BusClosed("the in-process ControlBus is closed")
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        try:
            check_event(self._validator, topic, value)
            payload = encode_event(value)
        except InvalidEvent:
            self._invalid_events += 1
            raise
        return self._append(topic, key, payload, headers, checked=True)

    def append_raw(
        self,
        topic: str,
        payload: str | bytes,
        *,
        key: str,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Append ``payload`` (JSON text) without validating it.

        For tests and replay tools: it stands for a message that reached the topic
        without this bus's validation (another producer, an older schema). It is
        decoded and validated on consume like anything read from Kafka.
        """
        if self._closed:
            raise BusClosed("the in-process ControlBus is closed")
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8", errors="surrogateescape")
        return self._append(topic, key, payload, headers, checked=False)

    def _append(self, topic: str, key: str, payload: str, headers, *, checked: bool) -> int:
        t = self._topics.get(topic) or self._create_topic(topic)
        hdrs = MappingProxyType(normalise_headers(headers)) if headers else _EMPTY_HEADERS
        part = t.partitions[zlib.crc32(key.encode("utf-8", "surrogatepass")) % self._num_partitions]
        offset = part.append(key, payload, hdrs, int(time.time() * 1000), checked)
        for sub in t.subscribers:
            sub._wakeup.set()
        return offset

    def _create_topic(self, topic: str) -> _Topic:
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"invalid topic name {topic!r}")
        t = self._topics[topic] = _Topic(topic, self._num_partitions, self._retention)
        return t

    # -- subscribe ------------------------------------------------------------
    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        consumer_id: str,
        from_beginning: bool = True,
    ) -> InProcessSubscription:
        if self._closed:
            raise BusClosed("the in-process ControlBus is closed")
        if isinstance(topics, str):
            topics = [topics]
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        if not consumer_id:
            raise ValueError("consumer_id must be a non-empty string")
        cursors: list[_Cursor] = []
        for name in dict.fromkeys(topics):
            t = self._topics.get(name) or self._create_topic(name)
            for p, part in enumerate(t.partitions):
                committed = self._committed.get((consumer_id, name, p))
                if committed is None:
                    # First subscription of this identity here: start at the beginning
                    # or the end, and commit that as its starting point, so a resume
                    # before its first commit neither loses nor replays anything.
                    committed = 0 if from_beginning else part.next_offset
                    self._committed[(consumer_id, name, p)] = committed
                cursors.append(_Cursor(name, p, part, committed, committed))
        sub = InProcessSubscription(self, consumer_id, cursors)
        for name in dict.fromkeys(topics):
            self._topics[name].subscribers.append(sub)
        return sub

    def _detach(self, sub: InProcessSubscription) -> None:
        for c in sub._cursors:
            subs = self._topics[c.topic].subscribers
            if sub in subs:
                subs.remove(sub)

    def _store_commit(self, consumer_id: str, topic: str, partition: int, next_offset: int) -> None:
        k = (consumer_id, topic, partition)
        if next_offset > self._committed.get(k, -1):
            self._committed[k] = next_offset

    # -- introspection (tests, metrics) -----------------------------------------
    def committed(self, consumer_id: str, topic: str, partition: int) -> int | None:
        """The next offset ``consumer_id`` will read on ``topic[partition]``, if committed."""
        return self._committed.get((consumer_id, topic, partition))

    async def end_offsets(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for topic in topics:
            t = self._topics.get(topic)
            if t is not None:
                out.update(((topic, p), part.next_offset) for p, part in enumerate(t.partitions))
        return out

    async def committed_offsets(self, consumer_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        wanted = set(topics)
        return {(topic, p): off for (cid, topic, p), off in self._committed.items() if cid == consumer_id and topic in wanted}

    def retained(self, topic: str) -> int:
        """How many messages ``topic`` retains (compacted ones included)."""
        t = self._topics.get(topic)
        return sum(len(p) for p in t.partitions) if t else 0

    def partition_for(self, key: str) -> int:
        return zlib.crc32(key.encode("utf-8", "surrogatepass")) % self._num_partitions


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
