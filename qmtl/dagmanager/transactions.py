"""Write transactions: serialised on SQLite (one process), on PostgreSQL holding the GC
advisory lock — shared by diffs, exclusive for GC, so a queue is never collected while a
diff re-uses it — and retried on a deadlock or serialisation failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from qmtl.store.sql import Database

from .errors import RETRY_SQLSTATES, sqlstate

log = logging.getLogger(__name__)

GC_LOCK_KEY = 0x716D746C  # "qmtl": the advisory lock diffs share and GC takes alone
RETRIES = 3
_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared($1::int8)"
_LOCK_EXCLUSIVE = "SELECT pg_advisory_xact_lock($1::int8)"

T = TypeVar("T")


class Transactions:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._serial = asyncio.Lock()  # SQLite: one writer at a time

    @contextlib.asynccontextmanager
    async def write(self, *, exclusive: bool = False) -> AsyncIterator[Any]:
        """A write transaction: serialised on SQLite; on PostgreSQL holding the GC
        advisory lock (shared for diffs, exclusive for GC)."""
        if self.db.is_sqlite:
            async with self._serial, self.db.begin() as conn:
                yield conn
            return
        async with self.db.begin() as conn:
            await conn.exec_driver_sql(_LOCK_EXCLUSIVE if exclusive else _LOCK_SHARED, (GC_LOCK_KEY,))
            yield conn

    async def retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, run again (up to three times) after a deadlock or serialisation failure."""
        for attempt in range(RETRIES + 1):
            try:
                return await fn()
            except DBAPIError as exc:
                if sqlstate(exc) in RETRY_SQLSTATES and attempt < RETRIES:
                    log.info("retrying after %s (attempt %d)", sqlstate(exc), attempt + 1)
                    await asyncio.sleep(0.005 * (attempt + 1))
                    continue
                raise
        raise AssertionError("unreachable")


__all__ = ["GC_LOCK_KEY", "Transactions"]
