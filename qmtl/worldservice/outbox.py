"""Transactional outbox: events are written in the transaction that makes the change and
published on the ControlBus only after it commits, in commit order per world.

Per-world order holds because every write transaction on a world first updates the
world's row (a row lock in PostgreSQL, the database write lock in SQLite), so outbox
rows of one world get increasing ``seq`` in commit order; :meth:`Outbox.flush`
publishes in ``seq`` order under one lock. A publish that fails leaves the row in
place; the background task retries until the bus takes it (at-least-once delivery).
One WorldService process owns a database (see the WorldService notes in the spec).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from qmtl.bus.base import ControlBus, InvalidEvent
from qmtl.common import correlation, tracing
from qmtl.contracts.events import event_validators
from qmtl.store.sql import Database
from qmtl.worldservice import store
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.views import now_utc

logger = logging.getLogger(__name__)

_BATCH = 500


class Outbox:
    def __init__(self, db: Database, bus: ControlBus, metrics: WorldServiceMetrics, *, retry_interval: float = 1.0) -> None:
        self.db = db
        self.bus = bus
        self.metrics = metrics
        self.retry_interval = retry_interval
        self._lock = asyncio.Lock()
        self._retry_needed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def add(self, conn: Any, topic: str, world_id: str, event: Mapping[str, Any]) -> None:
        """Queue ``event`` in the caller's transaction (validated against its schema first:
        an invalid event is a bug and must not be committed)."""
        event_validators().validate(topic, event)
        headers: dict[str, str] = {}
        cid = correlation.get()
        if cid:
            headers["correlation_id"] = cid
        tracing.inject(headers)  # published after the commit, still in the request's trace
        await conn.execute(
            store.outbox.insert().values(
                world_id=world_id, topic=topic, key=world_id, payload=dict(event), headers=headers, created_at=now_utc()
            )
        )

    async def pending(self) -> int:
        async with self.db.connect() as conn:
            n = (await conn.execute(sa.select(sa.func.count()).select_from(store.outbox))).scalar_one()
        self.metrics.outbox_pending.set(n)
        return int(n)

    async def flush(self) -> bool:
        """Publish every committed event, oldest first. False if the bus failed (retried later)."""
        async with self._lock:
            while True:
                async with self.db.connect() as conn:
                    rows = (
                        await conn.execute(sa.select(store.outbox).order_by(store.outbox.c.seq).limit(_BATCH))
                    ).mappings().all()
                if not rows:
                    self.metrics.outbox_pending.set(0)
                    return True
                done: list[int] = []
                ok = True
                for row in rows:
                    try:
                        await self.bus.publish(row["topic"], row["payload"], key=row["key"], headers=row["headers"] or None)
                    except InvalidEvent as exc:
                        # Validated before it was committed, so only a schema change in between
                        # can get here; the event can never be published: log it and drop it.
                        logger.error("dropping outbox event %s on %s: %s", row["seq"], row["topic"], exc)
                        self.metrics.events_dropped.inc()
                    except Exception as exc:
                        logger.warning("ControlBus publish failed (will retry): %r", exc)
                        self.metrics.publish_failures.inc()
                        ok = False
                        break
                    else:
                        self.metrics.events_published.labels(row["topic"]).inc()
                    done.append(row["seq"])
                if done:
                    async with self.db.begin() as conn:
                        await conn.execute(store.outbox.delete().where(store.outbox.c.seq.in_(done)))
                if not ok:
                    self._retry_needed.set()
                    await self.pending()
                    return False

    def schedule_retry(self) -> None:
        """Have the background task flush again shortly (after a failed flush)."""
        self._retry_needed.set()

    async def start(self) -> None:
        await self.flush()
        self._task = asyncio.create_task(self._retry_loop(), name="worldservice-outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _retry_loop(self) -> None:
        while True:
            await self._retry_needed.wait()
            await asyncio.sleep(self.retry_interval)
            self._retry_needed.clear()
            try:
                await self.flush()
            except Exception as exc:  # database down: try again later
                logger.warning("outbox flush failed (will retry): %r", exc)
                self._retry_needed.set()
