"""The DAG Manager service object: the parts :func:`qmtl.dagmanager.app.create_service`
builds, composed, with their common lifecycle (start, stop, drain) and health.

Handlers call the part that owns their operation: ``diffs`` (:mod:`.diff`), ``queues``
(:mod:`.queues`), ``sentinels`` (:mod:`.sentinels`), ``strategies`` (:mod:`.strategies`),
``gc`` (:mod:`.gc`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from qmtl.bus.base import ControlBus
from qmtl.store.outbox import Outbox
from qmtl.store.sql import Database

from . import store
from .analyze import GrowthAnalyzer
from .callbacks import GatewayCallback
from .diff import Differ
from .gc import GarbageCollector
from .metrics import DagManagerMetrics
from .queues import QueueCatalogue
from .sentinels import Sentinels
from .strategies import StrategyReferences
from .tagindex import QueueNotifier
from .topics import QueueTopics

log = logging.getLogger(__name__)


class DagManagerService:
    def __init__(
        self,
        *,
        db: Database,
        owns_db: bool,
        bus: ControlBus,
        metrics: DagManagerMetrics,
        topics: QueueTopics,
        callback: GatewayCallback,
        outbox: Outbox,
        notifier: QueueNotifier,
        analyzer: GrowthAnalyzer,
        diffs: Differ,
        queues: QueueCatalogue,
        sentinels: Sentinels,
        strategies: StrategyReferences,
        gc: GarbageCollector,
    ) -> None:
        self.db = db
        self.owns_db = owns_db  # the factory opened ``db``: the app closes it after stop()
        self.bus = bus
        self.metrics = metrics
        self.topics = topics
        self.callback = callback
        self.outbox = outbox
        self.notifier = notifier
        self.analyzer = analyzer
        self.diffs = diffs
        self.queues = queues
        self.sentinels = sentinels
        self.strategies = strategies
        self.gc = gc

    async def start(self) -> None:
        await self.db.create_all(store.metadata)
        await self.topics.admin.start()
        await self.callback.start()
        await self.notifier.start()
        await self.outbox.start()

    async def stop(self) -> None:
        await self.analyzer.stop()
        with contextlib.suppress(Exception):
            await self.notifier.drain(timeout=2.0)
        await self.notifier.close()
        await self.outbox.stop()
        with contextlib.suppress(Exception):
            await self.callback.drain(timeout=2.0)
        await self.callback.close()
        try:
            await self.topics.admin.close()
        except Exception:
            log.exception("closing the topic admin failed")

    async def drain(self) -> None:
        """Wait for background notifications, their publication and callbacks (tests)."""
        await self.notifier.drain()
        await self.outbox.flush()
        await self.callback.drain()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        admin = self.topics.admin
        try:
            async with self.db.connect() as conn:
                count = (await conn.execute(sa.select(sa.func.count()).select_from(store.queues))).scalar_one()
        except (TimeoutError, SQLAlchemyError, OSError, ConnectionError) as exc:
            log.warning("health: database down: %s", exc)
            return False, {"database": "down", "topic_admin": admin.mode}
        outbox = await self.outbox.stats()
        return True, {"status": "ok", "database": "ok", "topic_admin": admin.mode, "queues": int(count),
                      "outbox_pending": outbox["pending"], "outbox_oldest_age_seconds": outbox["oldest_age_seconds"]}


__all__ = ["DagManagerService"]
