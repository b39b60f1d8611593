"""The repository every part of WorldService works over: transactions on a world and the
reads and writes they share (the world row, its activation entries, its outbox events).

Every write runs in :meth:`Repository.write`: one transaction that starts by updating the
world's row (which serialises writes per world across processes and bumps its ``rev``),
under a per-world lock in this process; the outbox publisher is woken after the commit
(the write never waits for the ControlBus). Tables are in :mod:`qmtl.worldservice.store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from qmtl.bus.base import TOPIC_ACTIVATION
from qmtl.common.errors import NotFound
from qmtl.contracts.constants import WorldState
from qmtl.store.sql import Database
from qmtl.worldservice import store, views
from qmtl.worldservice.outbox import Outbox

#: What a transaction hands out: a SQLAlchemy ``AsyncConnection`` (kept loose: the parts
#: only pass it back to the repository, the audit log and the outbox).
Conn = Any


class Repository:
    def __init__(self, db: Database, outbox: Outbox, *, clock: Callable[[], datetime],
                 on_write: Callable[[str], None] = lambda world_id: None) -> None:
        """``on_write(world_id)`` is called when a write on the world starts and when it ends
        (committed or not): what caches state of the world in this process drops it."""
        self.db = db
        self.outbox = outbox
        self._clock = clock
        self._on_write = on_write
        # Per-world write locks, dropped when no request holds one (ids come from requests).
        self._world_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def now(self) -> datetime:
        """The service's time (UTC)."""
        now = store.utc(self._clock())
        assert now is not None
        return now

    def lock(self, world_id: str) -> asyncio.Lock:
        """This process's write lock of ``world_id``."""
        lock = self._world_locks.get(world_id)
        if lock is None:
            lock = self._world_locks[world_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def write(self, world_id: str) -> AsyncIterator[tuple[Conn, dict]]:
        """A write transaction on a live world: ``(conn, world row)``. After the commit the
        outbox publisher is woken; the write does not wait for the ControlBus. Every write on
        a world goes through here (it bumps the world's ``rev``)."""
        async with self.lock(world_id):
            self._on_write(world_id)
            try:
                async with self.db.begin() as conn:
                    world = await self._lock_world(conn, world_id)
                    yield conn, world
            finally:
                self._on_write(world_id)
        self.outbox.notify()

    async def _lock_world(self, conn: Conn, world_id: str) -> dict:
        w = store.worlds
        row = (
            await conn.execute(
                w.update()
                .where(w.c.world_id == world_id, w.c.state != WorldState.DELETED)
                .values(rev=w.c.rev + 1)
                .returning(*w.c)
            )
        ).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} not found")
        return dict(row)

    async def world(self, conn: Conn, world_id: str, *, include_deleted: bool = False) -> dict:
        """The world's row; 404 when there is none (or it is deleted, unless ``include_deleted``)."""
        w = store.worlds
        q = sa.select(w).where(w.c.world_id == world_id)
        if not include_deleted:
            q = q.where(w.c.state != WorldState.DELETED)
        row = (await conn.execute(q)).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} not found")
        return dict(row)

    async def entries(self, conn: Conn, world_id: str) -> list[dict]:
        """The world's stored activation entries."""
        a = store.activations
        rows = (await conn.execute(sa.select(a).where(a.c.world_id == world_id))).mappings().all()
        return [views.entry_from_row(r) for r in rows]

    async def put_entry(self, conn: Conn, world_id: str, entry: Mapping[str, Any], *, exists: bool) -> None:
        a = store.activations
        values = {k: entry[k] for k in ("active", "weight", "etag", "run_id", "ts")}
        if exists:
            await conn.execute(
                a.update()
                .where(a.c.world_id == world_id, a.c.strategy_id == entry["strategy_id"], a.c.side == entry["side"])
                .values(**values)
            )
        else:
            await conn.execute(a.insert().values(world_id=world_id, strategy_id=entry["strategy_id"], side=entry["side"], **values))

    async def emit_activation(self, conn: Conn, world_id: str, before: Mapping, after: Mapping, run_id: str | None = None) -> int:
        """Queue one ActivationUpdated per entry whose view changed; how many."""
        events = views.activation_events(before, after, run_id=run_id)
        for event in events:
            await self.outbox.add(conn, TOPIC_ACTIVATION, world_id, event)
        return len(events)
