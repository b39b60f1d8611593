"""Table statistics after growth (PostgreSQL). The diff's lookups are planned from table
statistics; right after the graph grew fast they are stale (autovacuum analyzes within a
minute or so) and a plan made for a tiny table can scan the whole table per row. Growth
therefore triggers an ANALYZE in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import sqlalchemy as sa

from qmtl.store.sql import Database

log = logging.getLogger(__name__)

ANALYZE_MIN_GROWTH = 500
ANALYZED_TABLES = ("dm_nodes", "dm_queues", "dm_queue_tags", "dm_strategy_nodes", "dm_sentinel_nodes")


class GrowthAnalyzer:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._grown = 0
        self._analyzed_at_size = 0
        self._task: asyncio.Task[None] | None = None

    def grew(self, rows: int) -> None:
        """``rows`` were added; ANALYZE once growth reaches a fifth of the analyzed size."""
        if self.db.is_sqlite:
            return
        self._grown += rows
        if self._grown < max(ANALYZE_MIN_GROWTH, self._analyzed_at_size // 5):
            return
        if self._task is not None and not self._task.done():
            return
        self._analyzed_at_size += self._grown
        self._grown = 0
        self._task = asyncio.create_task(self._analyze(), name="dagmanager-analyze")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _analyze(self) -> None:
        try:
            async with self.db.connect() as conn:
                await conn.execute(sa.text(f"ANALYZE {', '.join(ANALYZED_TABLES)}"))
                await conn.commit()
        except Exception as exc:  # statistics are an optimisation; autovacuum will catch up
            log.info("ANALYZE after graph growth failed: %s", exc)


__all__ = ["GrowthAnalyzer"]
