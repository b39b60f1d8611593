"""A transactional outbox shared by WorldService and the DAG Manager.

A service writes its events in the transaction that makes the change
(:meth:`Outbox.add`), commits, calls :meth:`Outbox.notify` and answers: nothing on the
write path waits for the ControlBus. One background task per process publishes the
committed rows oldest first and deletes them once the bus took them; when the bus fails
it backs off (:class:`~qmtl.common.resilience.Backoff`) and tries again, so a broker
that is away for a minute costs no write any latency and loses no event.

**Order.** Rows get increasing ``seq``. Events of one key (a world, a (tags, interval)
pair) are committed one transaction at a time, because the writer holds a lock on the
key while it writes (WorldService: the world's row; DAG Manager: an advisory lock on
the key), so the ``seq`` of one key's rows follows their commit order. The publisher
sends each key's rows in ``seq`` order and stops at the first failure, so a key's
events reach the bus in commit order.

**Several processes on one PostgreSQL database.** Each publishing transaction takes
``pg_try_advisory_xact_lock`` on the keys of the oldest rows it sees and publishes only
the rows of the keys it got (read again under the locks, so a row another process
deleted meanwhile is not sent twice); other processes skip those keys and take others.
A key is published by one process at a time, in order; a process that dies leaves its
rows to the others (every publisher also polls every ``poll_interval`` seconds).
Delivery is at least once: a process killed between the bus's acknowledgement and the
commit of the delete leaves rows that are published again (consumers are idempotent by
etag / event id). On SQLite (embedded) one process publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from qmtl.bus.base import ControlBus, InvalidEvent
from qmtl.common import correlation, logs, tracing
from qmtl.common.resilience import Backoff
from qmtl.store.sql import Database

logger = logging.getLogger(__name__)

BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def outbox_table(metadata: sa.MetaData, name: str, *extra: sa.Column) -> sa.Table:
    """An outbox table: ``seq`` (order), ``topic``, ``key``, ``payload``, ``headers``,
    ``created_at`` (for the backlog's age), plus ``extra`` columns of the service."""
    return sa.Table(
        name,
        metadata,
        sa.Column("seq", BigIntId, primary_key=True, autoincrement=True),
        *extra,
        sa.Column("topic", sa.String(64), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def lock_id(namespace: str, key: str) -> int:
    """A signed 64-bit PostgreSQL advisory lock id for ``key`` in ``namespace``."""
    digest = hashlib.blake2b(f"{namespace}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_key(conn: Any, namespace: str, key: str) -> None:
    """Hold an advisory lock on ``key`` until the caller's transaction ends (PostgreSQL;
    no-op on SQLite, whose writers are serialised by the database). For writers that
    serialise one key's events; use a namespace of their own, not the outbox's ``name``
    (the publisher's claim), so that a write never waits for a publish in progress."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_id(namespace, key)})


def _noop(*_args: Any) -> None:
    return None


@dataclass
class OutboxMetrics:
    """How an outbox reports: callbacks for counters, gauges (or None) for the backlog."""

    published: Callable[[str], None] = _noop  # topic
    failed: Callable[[], None] = _noop  # a publish attempt failed (retried)
    dropped: Callable[[], None] = _noop  # an event the bus refused as invalid (never publishable)
    pending: Any = None  # Gauge: committed events not yet published
    oldest_age: Any = None  # Gauge: age in seconds of the oldest of them (0 when none)


_TRY_LOCKS = sa.text(
    "SELECT k FROM unnest(CAST(:keys AS bigint[])) AS k WHERE pg_try_advisory_xact_lock(k)"
).bindparams(sa.bindparam("keys", type_=postgresql.ARRAY(sa.BigInteger)))


class Outbox:
    def __init__(
        self,
        db: Database,
        bus: ControlBus,
        table: sa.Table,
        *,
        validate: Callable[[str, Mapping[str, Any]], None] | None = None,
        metrics: OutboxMetrics | None = None,
        poll_interval: float = 1.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        batch: int = 500,
        name: str = "outbox",
    ) -> None:
        self.db = db
        self.bus = bus
        self.table = table
        self.validate = validate
        self.metrics = metrics or OutboxMetrics()
        self.poll_interval = float(poll_interval)
        Backoff(*backoff)  # validates the pair
        self.backoff = backoff
        self.batch = int(batch)
        self.name = name
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------ writers

    async def add(self, conn: Any, topic: str, key: str, event: Mapping[str, Any], **extra: Any) -> None:
        """Queue ``event`` in the caller's transaction (validated first: an invalid event is
        a bug and must not be committed). Call :meth:`notify` after the commit."""
        if self.validate is not None:
            self.validate(topic, event)
        headers: dict[str, str] = {}
        cid = correlation.get()
        if cid:
            headers["correlation_id"] = cid
        tracing.inject(headers)  # published after the commit, still in the request's trace
        await conn.execute(
            self.table.insert().values(
                topic=topic, key=key, payload=dict(event), headers=headers, created_at=datetime.now(UTC), **extra
            )
        )

    def notify(self) -> None:
        """Something was committed: have the publisher run now (never waits)."""
        self._wake.set()

    # ------------------------------------------------------------------ backlog

    async def stats(self) -> dict[str, Any]:
        """``{"pending": n, "oldest_age_seconds": s}`` from the database (all processes'
        rows); also sets the gauges."""
        t = self.table
        async with self.db.connect() as conn:
            n, oldest = (await conn.execute(sa.select(sa.func.count(), sa.func.min(t.c.created_at)))).one()
        age = 0.0
        if oldest is not None:
            if oldest.tzinfo is None:  # SQLite reads naive datetimes back; they are UTC
                oldest = oldest.replace(tzinfo=UTC)
            age = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        if self.metrics.pending is not None:
            self.metrics.pending.set(n)
        if self.metrics.oldest_age is not None:
            self.metrics.oldest_age.set(age)
        return {"pending": int(n), "oldest_age_seconds": round(age, 3)}

    async def pending(self) -> int:
        return (await self.stats())["pending"]

    # ------------------------------------------------------------------ publishing

    async def flush(self) -> bool:
        """Publish every committed event this process can claim, oldest first. False when
        the bus failed (the rest stays for the next attempt)."""
        async with self._lock:
            while True:
                published, ok = await self._publish_batch()
                if not ok:
                    return False
                if published == 0:
                    return True

    async def _publish_batch(self) -> tuple[int, bool]:
        t = self.table
        pg = not self.db.is_sqlite
        async with self.db.begin() as conn:
            if pg:
                oldest = sa.select(t.c.key).order_by(t.c.seq).limit(self.batch).subquery()
                keys = (await conn.execute(sa.select(oldest.c.key).distinct())).scalars().all()
                if not keys:
                    return 0, True
                ids = {lock_id(self.name, k): k for k in keys}
                got = (await conn.execute(_TRY_LOCKS, {"keys": list(ids)})).scalars().all()
                mine = [ids[i] for i in got]
                if not mine:
                    return 0, True  # every key is being published by another process
                query = sa.select(t).where(t.c.key.in_(mine))
            else:
                query = sa.select(t)
            rows = (await conn.execute(query.order_by(t.c.seq).limit(self.batch))).mappings().all()
            if not rows:
                return 0, True
            done: list[int] = []
            ok = True
            for row in rows:
                try:
                    await self.bus.publish(row["topic"], row["payload"], key=row["key"], headers=row["headers"] or None)
                except InvalidEvent as exc:
                    # Validated before it was committed, so only a schema change in between
                    # can get here; the event can never be published: log it and drop it.
                    logger.error("%s: dropping event %s on %s: %s", self.name, row["seq"], row["topic"], exc)
                    self.metrics.dropped()
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.metrics.failed()
                    ok = False
                    break  # the rest keeps its order for the next attempt
                else:
                    self.metrics.published(row["topic"])
                done.append(row["seq"])
            if done:
                await conn.execute(t.delete().where(t.c.seq.in_(done)))
        if ok:
            self.last_error = None
        return len(done), ok

    # ------------------------------------------------------------------ background task

    async def start(self) -> None:
        """Start the publisher (it publishes what earlier processes left at once)."""
        if self._task is None:
            self._wake.set()
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-publisher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        logs.label_task(f"outbox:{self.name}")
        backoff = Backoff(*self.backoff)
        failures = 0
        stats_at = float("-inf")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                ok = await self.flush()
            except Exception as exc:  # the database is away: the rows wait for it
                self.last_error = f"{type(exc).__name__}: {exc}"
                ok = False
            if ok:
                if failures:
                    logger.info("%s: publishing again after %d failed attempt(s)", self.name, failures)
                failures = 0
                backoff.reset()
            else:
                failures += 1
                delay = backoff.next()
                logger.log(
                    logging.WARNING if failures == 1 else logging.INFO,
                    "%s: publishing failed (%s); retrying in %.2fs (attempt %d)",
                    self.name, self.last_error, delay, failures,
                )
                await asyncio.sleep(delay)
                self._wake.set()
            now = asyncio.get_running_loop().time()
            if now - stats_at >= self.poll_interval:  # the gauges, at most once per poll interval
                stats_at = now
                with contextlib.suppress(Exception):
                    await self.stats()


__all__ = ["Outbox", "OutboxMetrics", "lock_id", "lock_key", "outbox_table"]
