"""The tag index and its change notifications (SPEC §3, §5, §7).

Live queues are indexed by (tag, interval) in ``dm_queue_tags``. A *watch* is a
(tags, interval, match_mode) someone asked about — a ``GET /queues/by_tag`` or a
TagQueryNode in a diffed DAG — stored with the etag of its set as last announced.
When queues are created or collected, :class:`QueueNotifier` (one background task)
recomputes every watch they can affect and, for each whose set changed, records the
new etag and queues ``QueueUpdated`` (``control.queues``, key ``queue_key(tags,
interval)``, validated against its schema) in the DAG Manager's transactional outbox
(:mod:`qmtl.store.outbox`) in one transaction, then sends the legacy ``queue_update``
callback to the Gateway. The outbox publishes it when the ControlBus takes it (a broker
that is away delays the event, never loses it, and nothing waits for it). The
recomputation holds an advisory lock on the bus key (PostgreSQL), so with several DAG
Manager replicas a change is recorded once and one key's events are committed, and
published, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from qmtl.bus.base import TOPIC_QUEUES, ControlBus
from qmtl.bus.keys import queue_key
from qmtl.contracts.constants import MATCH_MODES, MatchMode
from qmtl.store.outbox import Outbox, lock_key
from qmtl.store.sql import Database

from . import store
from .callbacks import GatewayCallback
from .metrics import DagManagerMetrics

MATCH_ALL = MatchMode["ALL"]

log = logging.getLogger(__name__)



def iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Sorted, unique, blanks stripped, empties dropped."""
    return tuple(sorted({t.strip() for t in tags if t and t.strip()}))


@dataclass(frozen=True)
class TagKey:
    tags: tuple[str, ...]
    interval: int
    match_mode: str

    @classmethod
    def of(cls, tags: Iterable[str], interval: int, match_mode: str | None) -> TagKey:
        if match_mode is None or match_mode not in MATCH_MODES:
            raise ValueError(f"match_mode must be one of {', '.join(MATCH_MODES)}, not {match_mode!r}")
        return cls(normalise_tags(tags), int(interval), match_mode)

    @property
    def watch_key(self) -> str:
        material = json.dumps([list(self.tags), self.interval, self.match_mode], separators=(",", ":"))
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    @property
    def bus_key(self) -> str:
        return queue_key(self.tags, self.interval)

    def matches(self, tags: Iterable[str], interval: int) -> bool:
        """Whether a queue with ``tags`` at ``interval`` is in this key's set."""
        if interval != self.interval:
            return False
        have = set(tags)
        if self.match_mode == MATCH_ALL:
            return all(t in have for t in self.tags)
        return any(t in have for t in self.tags)


def etag_of(key: TagKey, queues: Sequence[str]) -> str:
    """``q-`` + 24 hex of SHA-256 over the key and its sorted queue list."""
    material = json.dumps([list(key.tags), key.interval, key.match_mode, sorted(queues)], separators=(",", ":"))
    return "q-" + hashlib.sha256(material.encode()).hexdigest()[:24]


def match_statement(key: TagKey) -> Any:
    qt, q = store.queue_tags, store.queues
    stmt = (
        sa.select(q.c.topic)
        .select_from(qt.join(q, q.c.qid == qt.c.qid))
        .where(qt.c.interval == key.interval, qt.c.sim == sa.false(), qt.c.tag.in_(list(key.tags)))
    )
    if key.match_mode == MATCH_ALL and len(key.tags) > 1:
        # (tag, interval, sim, qid) is the primary key: a queue carrying every tag has len(tags) rows.
        stmt = stmt.group_by(q.c.topic).having(sa.func.count() == len(key.tags))
    else:
        stmt = stmt.distinct()
    return stmt.order_by(q.c.topic)


async def match(conn: Any, key: TagKey) -> list[str]:
    if not key.tags:
        return []
    return [r[0] for r in (await conn.execute(match_statement(key))).all()]


@dataclass(frozen=True)
class QueueChange:
    """A live queue that appeared or disappeared."""

    topic: str
    tags: tuple[str, ...]
    interval: int


class QueueNotifier:
    """One background task that turns queue changes into QueueUpdated events."""

    def __init__(
        self,
        db: Database,
        bus: ControlBus,
        *,
        callback: GatewayCallback,
        metrics: DagManagerMetrics,
        clock: Callable[[], float] = time.time,
        include_match_mode: bool = False,
        write: Callable[[], Any] | None = None,
        outbox: Outbox,
    ) -> None:
        self.db = db
        self._write = write or db.begin
        self.bus = bus
        self.outbox = outbox
        self.callback = callback
        self.metrics = metrics
        self.clock = clock
        # The QueueUpdated schema may or may not allow `match_mode` (an optional,
        # compatible extension); include it only when it does, so events stay valid.
        self.include_match_mode = include_match_mode
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.known_watches: set[str] = set()

    async def start(self) -> None:
        """Start the task; its first job recomputes every watch, so a change another process
        committed and died before announcing is announced now."""
        if self._task is None:
            self._queue.put_nowait(("all", None))
            self._task = asyncio.create_task(self._run(), name="dagmanager-queue-notifier")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def queues_changed(self, changes: Sequence[QueueChange]) -> None:
        if changes:
            self._queue.put_nowait(("changes", list(changes)))

    def recheck(self, keys: Sequence[TagKey]) -> None:
        if keys:
            self._queue.put_nowait(("recheck", list(keys)))

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued change was processed (tests, GC, shutdown)."""
        if self._task is None:
            return
        await asyncio.wait_for(self._queue.join(), timeout)

    async def _run(self) -> None:
        while True:
            # everything queued meanwhile (a burst of diffs) is taken at once: consecutive
            # changes (and rechecks) are merged into one pass — one read of the watches
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                for kind, payload in _merged(items):
                    try:
                        if kind == "changes":
                            await self._process_changes(payload)
                        elif kind == "all":
                            await self._process_all()
                        else:
                            await self._process_keys(payload)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("processing tag-index changes failed; the next change will recompute the affected sets")
            finally:
                for _ in items:
                    self._queue.task_done()

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[Any]:
        """A connection for one read: on PostgreSQL in autocommit (no BEGIN and ROLLBACK
        round trips around a single SELECT)."""
        async with self.db.connect() as conn:
            if not self.db.is_sqlite:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    async def _process_changes(self, changes: list[QueueChange]) -> None:
        intervals = sorted({c.interval for c in changes})
        w = store.tag_watches
        async with self._reading() as conn:
            rows = (await conn.execute(sa.select(w).where(w.c.interval.in_(intervals)))).all()
        affected = []
        for row in rows:
            key = TagKey(tuple(store.loads(row.tags)), row.interval, row.match_mode)
            if any(key.matches(c.tags, c.interval) for c in changes):
                affected.append((key, row.etag))
        await self._recompute(affected)

    async def _process_all(self, page: int = 1000) -> None:
        w = store.tag_watches
        after = ""
        while True:
            async with self.db.connect() as conn:
                rows = (await conn.execute(
                    sa.select(w).where(w.c.watch_key > after).order_by(w.c.watch_key).limit(page))).all()
            if not rows:
                return
            after = rows[-1].watch_key
            await self._recompute([(TagKey(tuple(store.loads(r.tags)), r.interval, r.match_mode), r.etag) for r in rows])

    async def _process_keys(self, keys: list[TagKey]) -> None:
        w = store.tag_watches
        async with self._reading() as conn:
            rows = (await conn.execute(sa.select(w.c.watch_key, w.c.etag).where(w.c.watch_key.in_([k.watch_key for k in keys])))).all()
        etags = {r.watch_key: r.etag for r in rows}
        await self._recompute([(k, etags[k.watch_key]) for k in keys if k.watch_key in etags])

    async def _recompute(self, affected: list[tuple[TagKey, str]]) -> None:
        w = store.tag_watches
        for key, old_etag in affected:
            async with self._reading() as conn:
                queues = await match(conn, key)
            if etag_of(key, queues) == old_etag:
                continue
            # Again under the key's lock, against the etag as recorded now: another replica
            # may have announced this change already.
            async with self._write() as conn:
                await lock_key(conn, "dagmanager-watch", key.bus_key)  # not the publisher's claim: writers never wait for it
                recorded = (await conn.execute(sa.select(w.c.etag).where(w.c.watch_key == key.watch_key))).scalar_one_or_none()
                queues = await match(conn, key)
                etag = etag_of(key, queues)
                if recorded is None or etag == recorded:
                    continue
                await self.outbox.add(conn, TOPIC_QUEUES, key.bus_key, self._event(key, queues, etag))
                await conn.execute(
                    sa.update(w).where(w.c.watch_key == key.watch_key).values(etag=etag, updated_at=self.clock())
                )
            self.outbox.notify()
            self.callback.send(
                "queue_update",
                {"tags": list(key.tags), "interval": key.interval, "queues": queues, "match_mode": key.match_mode, "etag": etag},
            )

    def _event(self, key: TagKey, queues: list[str], etag: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "QueueUpdated",
            "version": 1,
            "tags": list(key.tags),
            "interval": key.interval,
            "queues": queues,
            "etag": etag,
            "ts": iso(self.clock()),
        }
        if self.include_match_mode:
            event["match_mode"] = key.match_mode
        return event


def _merged(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Queued work in order, consecutive items of one kind merged (``all`` once)."""
    out: list[tuple[str, Any]] = []
    for kind, payload in items:
        if out and out[-1][0] == kind:
            if kind != "all":
                out[-1] = (kind, list(dict.fromkeys(out[-1][1] + payload)))
            continue
        out.append((kind, payload))
    return out


async def register_watches(conn: Any, helpers: store.SqlHelpers, keys: dict[TagKey, list[str]], now: float) -> list[TagKey]:
    """Record watches (with the etag of the set just computed); return the new ones."""
    if not keys:
        return []
    ordered = sorted(keys, key=lambda k: k.watch_key)  # rows in key order: concurrent diffs lock them in the same order
    values = {
        "watch_key": [k.watch_key for k in ordered],
        "tags": [store.dumps(list(k.tags)) for k in ordered],
        "interval": [k.interval for k in ordered],
        "match_mode": [k.match_mode for k in ordered],
        "etag": [etag_of(k, keys[k]) for k in ordered],
        "updated_at": now,
    }
    if helpers.is_sqlite and len(keys) > store.SQLITE_RETURNING_ROWS:  # (SQLite's bulk path would not say which are new)
        rows = [dict(zip(values, row)) for row in zip(*(v if isinstance(v, list) else [v] * len(keys) for v in values.values()))]
        new = {r[0] for r in await helpers.insert_ignore_returning(conn, store.tag_watches, rows, [store.tag_watches.c.watch_key])}
    else:  # driver SQL: one statement string per dialect, not compiled per call
        inserted = await helpers.insert_ignore(conn, store.tag_watches, values, returning=("watch_key",))
        new = set(inserted[0]) if inserted else set()
    return [k for k in keys if k.watch_key in new]


def schema_allows_match_mode() -> bool:
    try:
        from qmtl.contracts.loader import load_schema_files

        schema = load_schema_files()["event_queue_updated.schema.json"]
    except Exception:  # pragma: no cover - the spec is loaded and checked at start anyway
        return False
    return "match_mode" in (schema.get("properties") or {}) or schema.get("additionalProperties", True) is not False


__all__ = [
    "MATCH_MODES",
    "QueueChange",
    "QueueNotifier",
    "TagKey",
    "etag_of",
    "iso",
    "match",
    "normalise_tags",
    "register_watches",
    "schema_allows_match_mode",
]
